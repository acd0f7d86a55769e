"""Dense perplexity of a model on a corpus split at several window lengths.

    .venv/bin/python -m bench.dense_ppl --model embedded --data brown --seqlens 128 1024
"""

from __future__ import annotations

import argparse

from bench.common import markdown_table, write_results
from pruner.corpus import load_text
from pruner.evaluate import perplexity
from pruner.models import load_model
from pruner.windows import eval_windows, tokenize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--name", default="dense_ppl")
    args = ap.parse_args()
    loaded = load_model(args.model, dtype=args.dtype)
    ids = tokenize(loaded.tokenizer, load_text(args.data, args.split))
    rows = []
    for seqlen in args.seqlens:
        res = perplexity(loaded.model, eval_windows(ids, seqlen), batch_size=max(1, 1024 // seqlen), progress=True)
        rows.append({"model": args.model, "data": f"{args.data}/{args.split}", "dtype": args.dtype, **res})
        print(rows[-1], flush=True)
    md = "### Dense perplexity\n\n" + markdown_table(rows, ["model", "data", "dtype", "seqlen", "windows", "tokens", "ppl"],
                                                     {"ppl": "{:.2f}"})
    write_results(args.name, {"rows": rows}, md)


if __name__ == "__main__":
    main()
