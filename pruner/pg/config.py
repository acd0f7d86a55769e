"""The knobs of the policy-gradient search, described once.

Each field carries its help text, label and bounds in its metadata (`knob`); the CLI flags
(pruner.cli) and the studio's form (app_pages/prune.py) are generated from them, and `validate`
checks them, so a knob is added in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..budget import BUDGETS, SCOPES
from ..errors import PrunerError
from ..gathered import FORWARD_MODES
from ..pg_math import BASELINES, ESTIMATORS, INITS, SAMPLINGS

INIT_METRICS = ("flap", "wanda-sp", "taylor", "magnitude")
FORWARD_DTYPES = ("auto", "fp32", "bf16")
RESULTS = ("best", "last")


def knob(default, help: str, label: str, lo=None, hi=None, choices: tuple | None = None, advanced: bool = False):
    """A dataclass field with the metadata the CLI and the studio form are built from.
    `lo`/`hi` bound numbers (inclusive); `choices` lists the allowed strings."""
    return field(default=default, metadata={"help": help, "label": label, "lo": lo, "hi": hi, "choices": choices,
                                            "advanced": advanced})


@dataclass(frozen=True)
class PGConfig:
    """Knobs of the policy-gradient search; defaults sized for the embedded model on 2 CPU cores and
    chosen on the validation split (bench/results/pg_convergence_variants.md: one sequence per step,
    antithetic pairs, lr 0.003 were the only setting that did not lose perplexity from the metric
    start within 200 steps; result=best: bench/results/pg_best_cpu.md, where the last hard mask lost
    the start's perplexity and the best on held-out blocks kept it). The reference runs 15,000 steps
    of 8 x 128 tokens with lr 2e-3 on 7B."""

    steps: int = knob(240, "search steps", "Steps", 1, 10_000_000)
    samples: int = knob(2, "K masks sampled per step, each scored on the batch (>= 2)", "Samples per step (K)", 2, 1024)
    batch_size: int = knob(1, "sequences per mask", "Batch size", 1, 4096)
    seqlen: int = knob(128, "tokens per calibration block", "Sequence length", 2, 1_000_000)
    lr: float = knob(0.003, "initial learning rate (cosine decay to 0)", "Learning rate", 1e-8, 1e3)
    window: int = knob(5, "T of the moving-average baseline. It is updated with this step's losses before the "
                          "gradient, which scales the expected step by (K - 1/T) / (K - 1)", "Baseline window (T)",
                       1, 1_000_000)
    baseline: str = knob("moving", "what the losses are centred on: moving (an average over steps, window T, "
                                   "updated with this step's losses first, as the reference scripts do: it scales "
                                   "the expected step by (K - 1/T)/(K - 1)); loo (leave-one-out: each sample against "
                                   "the mean of the others, unbiased); none", "Baseline", choices=BASELINES)
    sampling: str = knob("antithetic", "independent: K independent masks, scored with the baseline below; "
                                        "antithetic: K/2 pairs from one uniform each (1[u < s], 1[1 - u < s]), "
                                        "scored with DisARM, which needs no baseline (K even)", "Sampling",
                         choices=SAMPLINGS)
    estimator: str = knob("reference", "reference: (L-b)(m-s)/sqrt(s(1-s)); exact: (L-b)(m-s)/(s(1-s))", "Estimator",
                          choices=ESTIMATORS)
    budget: str = knob("separate", "separate: heads and channels each keep 1-ratio in expectation; joint: one "
                                   "parameter budget that heads and channels share", "Budget", choices=BUDGETS)
    scope: str = knob("global", "global: one budget over all layers (layers find their own sparsity); "
                                "per_layer: every layer keeps 1-ratio", "Scope", choices=SCOPES)
    init: str = knob("sigmap", "sigmap, const or norm map a metric to probabilities; mask starts from the "
                               "metric method's own mask at this ratio (kept units high, removed low, the "
                               "gap 2c - 1; with the joint budget the first hard mask is that mask, topped "
                               "up to the budget where the method removed more); random ignores it",
                     "Initialisation", choices=INITS)
    init_metric: str = knob("flap", "the metric behind sigmap / const / norm / mask", "Init metric",
                            choices=INIT_METRICS)
    init_const: float = knob(0.9, "c of the const and mask inits", "Const init c", 0.5, 1.0, advanced=True)
    penalty: float = knob(0.0, "weight of the log-odds penalty (decays with the learning rate)", "Log-odds penalty",
                          0.0, 1e6, advanced=True)
    prob_floor: float = knob(0.01, "keep every s in [floor, 1 - floor] so every unit stays explorable (0: the "
                                   "reference)", "Probability floor", 0.0, 0.49, advanced=True)
    forward_dtype: str = knob("auto", "auto: bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls were several times "
                                      "slower on the CPUs measured)", "Forward dtype", choices=FORWARD_DTYPES,
                              advanced=True)
    forward_mode: str = knob("auto", "gathered: each sampled mask runs on only the weights it keeps (a mask "
                                     "keeping a fraction f costs about f of the decoder-linear compute); "
                                     "masked: all K masks in one batched forward of the full model, masks "
                                     "multiplying activations (the reference); auto: masked on CUDA, gathered "
                                     "elsewhere (the faster of the two where measured). Same losses",
                             "Forward", choices=FORWARD_MODES, advanced=True)
    bias_compensation: bool = knob(True, "score each sampled mask, and save the result, with FLAP's bias "
                                         "compensation: removed channels take their calibration means (off: the "
                                         "reference, removed channels at zero)", "Bias compensation")
    result: str = knob("best", "which hard mask the search returns. best: of those scored along the way (the start, "
                               "every eval_every steps, the end), the one with the lowest perplexity on calibration "
                               "blocks held out of the search (so it never ends worse than its start there); last: "
                               "the hard mask of the final probabilities", "Result", choices=RESULTS)
    holdout_blocks: int = knob(16, "calibration blocks held out of the search, never a batch: the hard masks are "
                                   "scored on them for result=best (0: none)", "Held-out blocks", 0, 100_000,
                               advanced=True)
    eval_every: int = knob(40, "steps between validation (and held-out) perplexities of the current hard mask", "Evaluate every",
                           1, 10_000_000, advanced=True)
    eval_windows: int = knob(16, "validation windows per evaluation", "Evaluation windows", 1, 100_000, advanced=True)
    snapshot_every: int = knob(10, "steps between probability snapshots (heatmaps)", "Snapshot every", 1, 10_000_000,
                               advanced=True)
    checkpoint_every: int = knob(20, "steps between checkpoints", "Checkpoint every", 1, 10_000_000, advanced=True)

    def validate(self) -> "PGConfig":
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(f.default, bool):
                ok = isinstance(value, bool)
            elif isinstance(f.default, (int, float)):
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                      and (meta["lo"] is None or value >= meta["lo"]) and (meta["hi"] is None or value <= meta["hi"]))
                ok = ok and (isinstance(value, int) or isinstance(f.default, float))
            else:
                ok = value in meta["choices"]
            if not ok:
                raise PrunerError(f"bad policy-gradient setting: {f.name}={value!r}; expected {describe(f)}")
        if self.result == "best" and self.holdout_blocks < 1:
            raise PrunerError("result=best chooses among hard masks on held-out calibration blocks: "
                              "holdout_blocks must be at least 1 (or use result=last)")
        if self.sampling == "antithetic" and self.samples % 2:
            raise PrunerError(f"antithetic sampling draws masks in pairs: samples (K) must be even, not {self.samples}")
        return self


# Knobs added after runs were saved, with the value those runs behaved as: a saved run resumes as it ran.
ADDED_KNOBS = {"sampling": "independent", "result": "last", "holdout_blocks": 0}


def with_added_knobs(saved: dict) -> dict:
    """A saved PGConfig dict with the knobs added since (ADDED_KNOBS) at their earlier behaviour."""
    return {**ADDED_KNOBS, **saved}


def describe(f) -> str:
    """The allowed values of a knob, in words."""
    meta = f.metadata
    if isinstance(f.default, bool):
        return "true or false"
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    kind = "an integer" if isinstance(f.default, int) else "a finite number"
    return f"{kind} in [{meta['lo']}, {meta['hi']}]"


def pg_fields():
    """The knobs, in declaration order (for generated flags and forms)."""
    return fields(PGConfig)
