"""A policy-gradient step at LLaMA-2-7B and -13B shapes on one GPU (random weights built from a
config: no download), to extrapolate the paper's 13B run (15,000 steps, 2.7 h on one A100).

Each shape: the model on the device, a search of K masks x B sequences x 128 tokens (default: the
reference's K = 2, B = 8), kv-group and channel units, random init; the time of one whole step
(sampling, the K forwards, the update, the projection) as the median of timed steps after warm-up,
and the peak device memory, in each forward mode (masked: all K masks in one batched forward of the
full model; gathered: each mask on only the weights it keeps). The `smollm2-135m` shape (the
embedded model's) sizes the searches of bench.pg_tuning and bench.quality on the device.

    python -m bench.pg_scale --shapes llama-2-7b llama-2-13b --name pg_scale_gpu
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from bench.common import SHAPES, markdown_table, random_llama, write_results
from pruner.gathered import FORWARD_MODES

PAPER_13B_HOURS, PAPER_STEPS = 2.7, 15_000


def time_steps(model, ratio: float, overrides: dict, steps: int, warmup: int, samples: int = 2,
               batch_size: int = 8) -> dict:
    from pruner.adapters import adapter_for
    from pruner.pg.config import PGConfig
    from pruner.pg.run import PGRun
    from pruner.space import PruningSpace

    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    blocks = torch.randint(0, vocab, (256, 128), generator=g)
    valid = torch.randint(0, vocab, (2, 128), generator=g)
    config = PGConfig(steps=steps + warmup, samples=samples, batch_size=batch_size, seqlen=128, init="random",
                      bias_compensation=False, eval_every=10**6, snapshot_every=10**6, checkpoint_every=10**6,
                      result="last", holdout_blocks=0, **overrides)
    run = PGRun(model, adapter, space, ratio, config, seed=0, blocks=blocks, valid=valid)
    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + warmup):
        sync()
        t0 = time.perf_counter()
        run.do_step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"step_s": statistics.median(times), "peak_gib": peak}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-2-7b", "llama-2-13b"], choices=list(SHAPES))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["masked", "gathered"], choices=[m for m in FORWARD_MODES if m != "auto"])
    ap.add_argument("--samples", type=int, nargs="+", default=[2], help="K values to time")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="sequences per mask to time")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="weights' dtype (fp32 weights run under bf16 autocast, as bench.quality's searches do)")
    ap.add_argument("--name", default="pg_scale")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.pg_scale needs a CUDA device")

    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for shape in args.shapes:
        model = random_llama(shape, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        for mode, k, batch in itertools.product(args.modes, args.samples, args.batch_sizes):
            result = time_steps(model, args.ratio, {"forward_mode": mode}, args.steps, args.warmup, k, batch)
            hours = result["step_s"] * PAPER_STEPS / 3600
            rows.append({"shape": shape, "params_b": params / 1e9, "mode": mode, "K": k, "batch": batch, **result,
                         "15k_steps_h": hours, "vs_paper_13b": hours / PAPER_13B_HOURS if shape == "llama-2-13b" else None})
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    md = (markdown_table(rows, ["shape", "params_b", "mode", "K", "batch", "step_s", "peak_gib", "15k_steps_h", "vs_paper_13b"],
                         {"params_b": "{:.2f}", "step_s": "{:.3f}", "peak_gib": "{:.1f}", "15k_steps_h": "{:.2f}",
                          "vs_paper_13b": "{:.2f}"})
          + f"\n\nOne PG step = K masks x batch x 128 tokens, {args.dtype} weights (bf16 autocast), ratio {args.ratio}, "
          f"random init (expected kept fraction 1 - ratio); median of {args.steps} steps "
          f"after {args.warmup} warm-up. 15k_steps_h = the paper's 15,000 steps at this step time; vs_paper_13b = "
          f"that over the paper's {PAPER_13B_HOURS} h for LLaMA-2-13B on one A100 (different GPU: a ratio of wall "
          "times, not of efficiency).")
    write_results(args.name, {"rows": rows, "args": vars(args)}, md)


if __name__ == "__main__":
    main()
