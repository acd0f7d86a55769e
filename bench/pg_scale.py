"""A policy-gradient step at LLaMA-2-7B and -13B shapes on one GPU (random weights built from a
config: no download), to extrapolate the paper's 13B run (15,000 steps, 2.7 h on one A100).

Each shape: the model in bf16 on the device, a search of K = 2 masks x 8 sequences x 128 tokens
(the reference setting), kv-group and channel units, random init; the time of one whole step
(sampling, the K masked forwards, the update, the projection) as the median of timed steps after
warm-up, and the peak device memory. Compute skipping (`gather`) is timed too where the search has it.

    python -m bench.pg_scale --shapes 7b 13b --name pg_scale_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from bench.common import markdown_table, write_results

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
}
PAPER_13B_HOURS, PAPER_STEPS = 2.7, 15_000


def build(shape: str, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def time_steps(model, ratio: float, overrides: dict, steps: int, warmup: int) -> dict:
    from pruner.adapters import adapter_for
    from pruner.pg.config import PGConfig
    from pruner.pg.run import PGRun
    from pruner.space import PruningSpace

    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 32000, (256, 128), generator=g)
    valid = torch.randint(0, 32000, (2, 128), generator=g)
    config = PGConfig(steps=steps + warmup, samples=2, batch_size=8, seqlen=128, init="random",
                      bias_compensation=False, eval_every=10**6, snapshot_every=10**6, checkpoint_every=10**6,
                      **overrides)
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
    ap.add_argument("--shapes", nargs="+", default=["7b", "13b"], choices=list(SHAPES))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--name", default="pg_scale")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.pg_scale needs a CUDA device")
    from pruner.pg.config import PGConfig

    device = torch.device("cuda")
    modes = {"masked": {}}
    if "gather" in {f.name for f in dataclasses.fields(PGConfig)}:
        modes = {"masked": {"gather": False}, "gathered": {"gather": True}}
    rows = []
    for shape in args.shapes:
        model = build(shape, device)
        params = sum(p.numel() for p in model.parameters())
        for mode, overrides in modes.items():
            result = time_steps(model, args.ratio, overrides, args.steps, args.warmup)
            hours = result["step_s"] * PAPER_STEPS / 3600
            rows.append({"shape": shape, "params_b": params / 1e9, "mode": mode, **result,
                         "15k_steps_h": hours, "vs_paper_13b": hours / PAPER_13B_HOURS if shape == "13b" else None})
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    md = (markdown_table(rows, ["shape", "params_b", "mode", "step_s", "peak_gib", "15k_steps_h", "vs_paper_13b"],
                         {"params_b": "{:.2f}", "step_s": "{:.3f}", "peak_gib": "{:.1f}", "15k_steps_h": "{:.2f}",
                          "vs_paper_13b": "{:.2f}"})
          + f"\n\nOne PG step = K=2 masks x 8 x 128 tokens, bf16, ratio {args.ratio}; median of {args.steps} steps "
          f"after {args.warmup} warm-up. 15k_steps_h = the paper's 15,000 steps at this step time; vs_paper_13b = "
          f"that over the paper's {PAPER_13B_HOURS} h for LLaMA-2-13B on one A100 (different GPU: a ratio of wall "
          "times, not of efficiency).")
    write_results(args.name, {"rows": rows, "args": vars(args)}, md)


if __name__ == "__main__":
    main()
