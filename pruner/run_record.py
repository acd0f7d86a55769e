"""A run folder's `status.json`: what a run is doing, as the Runs page and a resume read it.

One writer: the `RunRecord` of whoever drives the run (the CLI's foreground search, or the
studio's job); the search itself reports through a callback and never writes the file.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import PrunerError
from .fileio import read_json, write_json_atomically

STATUS_FILE = "status.json"
LIVE = ("created", "loading", "running", "paused", "saving")
FINAL = ("finished", "stopped", "failed")


class RunRecord:
    """Writes status.json of one run folder: status, step, steps, settings, error, has_model."""

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = Path(folder), settings
        self.fields = {"status": "created", "step": 0, "steps": 0, "error": None, "has_model": False}

    def write(self, **changes) -> dict:
        """Update some fields (status, step, steps, error, has_model) and write the whole record."""
        unknown = set(changes) - set(self.fields)
        if unknown:
            raise ValueError(f"unknown status fields {sorted(unknown)}")
        self.fields.update(changes)
        record = {**self.fields, "settings": self.settings, "updated": time.time()}
        write_json_atomically(self.folder / STATUS_FILE, record)
        return record


def read_record(folder: Path) -> dict:
    """A run folder's status.json; a damaged or missing one reads as status "unknown"."""
    try:
        return read_json(Path(folder) / STATUS_FILE, "run record")
    except PrunerError:
        return {"status": "unknown"}
