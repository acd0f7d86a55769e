"""Forward time of Probe Pruning on random-weight models of real shapes (a GPU measurement).

The time of a forward does not depend on the weights' values, and the numbers of heads and
channels Probe Pruning keeps are fixed by the ratio, so random weights of a model's shape time it
as the trained model would run. For each shape and ratio, on the same random token batches, one
after another: the dense forward, Probe Pruning (probe, scores, slicing and history update
included) and a statically sliced copy with the same kept counts per layer (what the forward
would cost with no probing and no per-batch slicing). Perplexities are meaningless here and not
reported; quality is bench/probe.py's job.

    python -m bench.probe_speed --shapes smollm2-135m llama-2-7b --batch-size 20 --seqlen 1024
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import SHAPES, markdown_table, random_llama, write_results
from pruner import probe_math as pm
from pruner.adapters import adapter_for
from pruner.models import LoadedModel, pick_device, pick_dtype
from pruner.probe import ProbeConfig, ProbePruner, collect_history, evaluate_dynamic

def random_model(shape: str, device: torch.device, dtype: torch.dtype, seqlen: int):
    model = random_llama(shape, device, dtype, max(seqlen, 2048))
    return LoadedModel(model, None, adapter_for(model), f"random {shape}", device, dtype)


def same_structure(loaded: LoadedModel, pruner: ProbePruner):
    """A sliced copy keeping, in every pruned layer, as many query heads and channels as Probe Pruning."""
    clone = copy.deepcopy(loaded.model)
    for l in pruner.layers:
        s = pruner.shapes[l]
        heads = torch.arange(pm.keep_count(s.n_q, pruner.layer_ratio), device=loaded.device)
        loaded.adapter.slice_query_heads(clone, l, heads)
        channels = pm.keep_count(s.d_ff, pruner.layer_ratio, pruner.config.mlp_multiple)
        loaded.adapter.slice_mlp(clone, l, torch.arange(channels, device=loaded.device))
    return clone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-2-7b"], choices=list(SHAPES))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--name", default="probe_speed")
    args = ap.parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    rows = []
    for shape in args.shapes:
        loaded = random_model(shape, device, dtype, args.seqlen)
        vocab = loaded.model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        windows = torch.randint(0, vocab, (args.batches * args.batch_size, args.seqlen), generator=g)
        calib = torch.randint(0, vocab, (4, args.seqlen), generator=g)
        pruners, static = {}, {}
        for ratio in args.ratios:
            config = ProbeConfig(ratio=ratio)
            n_layers = loaded.model.config.num_hidden_layers
            history = collect_history(loaded.model, loaded.adapter, calib.to(device), range(3, n_layers), batch_size=2)
            pruners[f"PP@{ratio}"] = ProbePruner(loaded.model, loaded.adapter, config, history)
            static[f"same structure, static@{ratio}"] = same_structure(loaded, pruners[f"PP@{ratio}"])
        t0 = time.perf_counter()
        result = evaluate_dynamic(loaded, windows, args.batch_size, pruners, static, warmup=True)
        for row in result["rows"]:
            rows.append({"shape": shape, "forward": row["name"], "time_ratio": row["time_ratio"],
                         "ms_per_batch": 1000 * row["seconds"] / row["batches"],
                         "probe_flops_share": row.get("probe_flops_share"), "flops_ratio": row.get("flops_ratio"),
                         "achieved_ratio": row["achieved_ratio"]})
            print(rows[-1], flush=True)
        print(f"{shape}: {time.perf_counter() - t0:.1f} s", flush=True)
        del loaded, pruners, static, result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    columns = ["shape", "forward", "time_ratio", "ms_per_batch", "probe_flops_share", "flops_ratio", "achieved_ratio"]
    fmt = {"time_ratio": "{:.3f}", "ms_per_batch": "{:.1f}", "probe_flops_share": "{:.4f}", "flops_ratio": "{:.3f}",
           "achieved_ratio": "{:.3f}"}
    md = (f"### Forward time of Probe Pruning on random-weight models ({device.type}, {str(dtype).replace('torch.', '')}, "
          f"{args.batches} batches of {args.batch_size} x {args.seqlen} random tokens)\n\n"
          "Each batch runs dense, then Probe Pruning at each ratio (probe, scoring, slicing and history update "
          "included), then a statically sliced copy with the same kept counts, one after another. "
          "`time_ratio`: summed wall time / dense; `flops_ratio` and `probe_flops_share`: analytic, decoder layers.\n\n"
          + markdown_table([{k: ("" if v is None else v) for k, v in r.items()} for r in rows], columns, fmt))
    write_results(args.name, {"args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
