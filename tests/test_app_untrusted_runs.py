"""The studio and run folders it did not write: a crafted pickle checkpoint is refused unread (no
code runs, the page says why), and run ids from the URL resolve only inside the runs folder."""

import json
import pickle
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pruner.config import PruneConfig

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120


class Exploit:
    """Unpickling this creates the file at `path`: proof that code from the pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNER_RUNS_DIR", str(tmp_path / "runs"))
    import app_pages.common as common

    common.studio.clear()  # a fresh run manager on the temporary folder
    yield tmp_path / "runs"
    common.studio.clear()


def crafted_run(folder: Path, marker: Path) -> Path:
    """A run folder as a stopped policy-gradient run looks, whose checkpoint is a pickle that
    would create `marker` when opened."""
    folder.mkdir(parents=True)
    settings = {"model": "embedded", **PruneConfig(method="pg", ratio=0.3).to_dict()}
    (folder / "status.json").write_text(json.dumps({"status": "stopped", "step": 3, "steps": 240, "error": None,
                                                    "has_model": False, "settings": settings,
                                                    "updated": time.time()}))
    (folder / "checkpoint.pt").write_bytes(pickle.dumps({"settings": Exploit(str(marker))}))
    return folder


def prune_page(run: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages/prune.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = run
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


def test_opening_a_run_with_a_pickled_checkpoint_runs_nothing(runs_dir, tmp_path):
    marker = tmp_path / "marker"
    crafted_run(runs_dir / "20260101-000000-pg-r30-beef", marker)
    at = prune_page("20260101-000000-pg-r30-beef")
    assert "pickled checkpoint" in errors(at) and "not opened" in errors(at)
    assert not marker.exists()
    resume = next(b for b in at.button if b.label == "Resume")
    resume.click().run()
    assert not at.exception, at.exception
    assert "pickled checkpoint" in errors(at)
    assert not marker.exists()


@pytest.mark.parametrize("outside", ["../elsewhere", "ABSOLUTE"])
def test_run_ids_that_leave_the_runs_folder_are_refused(outside, runs_dir, tmp_path):
    """A crafted run beside the runs folder is never read, by `../` nor by an absolute path."""
    marker = tmp_path / "marker"
    folder = crafted_run(tmp_path / "elsewhere", marker)
    runs_dir.mkdir()
    run = str(folder) if outside == "ABSOLUTE" else outside
    at = prune_page(run)
    assert f"invalid run id {run!r}" in errors(at) and "a plain name inside" in errors(at)
    assert not marker.exists()


def test_resume_on_the_runs_page_refuses_a_pickled_checkpoint(runs_dir, tmp_path):
    marker = tmp_path / "marker"
    crafted_run(runs_dir / "20260101-000000-pg-r30-beef", marker)
    at = AppTest.from_file(str(ROOT / "app_pages/runs.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    assert at.dataframe[0].value["status"].tolist() == ["stopped"]
    resume = next(b for b in at.button if b.label == "Resume")
    assert not resume.disabled
    resume.click().run()
    assert not at.exception, at.exception
    assert "pickled checkpoint" in errors(at) and "start a new run" in errors(at)
    assert not marker.exists()
