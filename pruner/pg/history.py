"""The watchable record of a search: per-step values, probability snapshots, hard-mask evaluations."""

from __future__ import annotations

import threading

MAX_SNAPSHOTS = 128  # older snapshots are thinned beyond this, so long searches stay small


class RunHistory:
    """Append-only record of a run, safe to read from other threads while it grows.

    steps:     one dict per step (losses, baseline, grad_variance, s statistics, lr, tokens/s, ...)
    snapshots: every `snapshot_every` steps, all probabilities per layer (for heatmaps); past
               MAX_SNAPSHOTS every other one (but the first and the newest) is dropped
    evals:     every `eval_every` steps, perplexity of the current hard mask on validation windows
               ("ppl"), and with held-out blocks on them ("holdout_ppl") with the best so far
               ("best_step", "best_holdout_ppl": the mask a result=best search returns)
    """

    def __init__(self, steps=None, snapshots=None, evals=None):
        self._lock = threading.Lock()
        self.steps: list[dict] = list(steps or [])
        self.snapshots: list[dict] = list(snapshots or [])
        self.evals: list[dict] = list(evals or [])

    def append(self, kind: str, item: dict) -> None:
        with self._lock:
            getattr(self, kind).append(item)
            if kind == "snapshots" and len(self.snapshots) > MAX_SNAPSHOTS:
                self.snapshots = self.snapshots[:-1:2] + self.snapshots[-1:]

    def read(self, steps_since: int = 0) -> dict:
        """Copies of the lists (steps from index `steps_since` on)."""
        with self._lock:
            return {"steps": self.steps[steps_since:], "snapshots": list(self.snapshots), "evals": list(self.evals)}
