"""The studio's run manager (background jobs, one at a time, resume from disk) and chart data."""

import dataclasses
import json
import time

import pytest
import torch

from pruner import views
from pruner.errors import PrunerError
from pruner.models import load_model
from pruner.config import PruneConfig
from pruner.pg.checkpoint import load_checkpoint
from pruner.pg.config import PGConfig
from pruner.studio import MODEL_SUBDIR, Studio, saved_history

TINY_PG = PGConfig(steps=4, samples=2, batch_size=1, seqlen=16, init="const", eval_every=2, eval_windows=2,
                   snapshot_every=2, checkpoint_every=1)
CALIB = 8  # calibration windows (bias compensation's means): enough for a test, seconds on a busy CPU


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded", device="cpu", dtype="fp32")


def wait_until(predicate, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def logits(loaded):
    ids = torch.arange(10, 26).view(1, -1)
    with torch.no_grad():
        return loaded.model(ids).logits


def test_pg_job_runs_in_the_background_and_saves_its_model(tmp_path, embedded):
    before = logits(embedded)
    studio = Studio(tmp_path)
    job = studio.start(embedded, PruneConfig(method="pg", ratio=0.3, calib_windows=CALIB, pg=TINY_PG))
    job.wait(300)
    assert job.status == "finished", job.error
    history = job.history()
    assert [r["step"] for r in history["steps"]] == [1, 2, 3, 4]
    assert [s["step"] for s in history["snapshots"]] == [0, 2, 4]
    assert [e["step"] for e in history["evals"]] == [2, 4]
    report = json.loads((tmp_path / job.id / MODEL_SUBDIR / "report.json").read_text())
    assert report["method"] == "pg" and abs(report["achieved_ratio"] - 0.3) < 0.02
    assert len(report["per_layer"]) == 30
    status = json.loads((tmp_path / job.id / "status.json").read_text())
    assert status["status"] == "finished" and status["has_model"]
    # the shared model was neither hooked nor changed
    assert all(not m._forward_pre_hooks for m in embedded.model.modules())
    torch.testing.assert_close(logits(embedded), before, rtol=0, atol=0)
    listed = studio.runs()
    assert [r["id"] for r in listed] == [job.id] and listed[0]["status"] == "finished"
    assert saved_history(tmp_path / job.id)["steps"][-1]["step"] == 4


def test_one_heavy_run_at_a_time_stop_resume_delete(tmp_path, embedded):
    studio = Studio(tmp_path)
    long = PruneConfig(method="pg", ratio=0.3, calib_windows=CALIB, pg=dataclasses.replace(TINY_PG, steps=10_000))
    job = studio.start(embedded, long)
    with pytest.raises(PrunerError, match="one heavy run at a time"):
        studio.start(embedded, PruneConfig(method="magnitude", ratio=0.3))
    wait_until(lambda: job.pg is not None and job.pg.step >= 2)
    job.pause()
    wait_until(lambda: job.status == "paused")
    paused_at = job.pg.step
    time.sleep(0.5)
    assert job.pg.step == paused_at
    job.resume()
    wait_until(lambda: job.pg.step > paused_at)
    with pytest.raises(PrunerError, match="still going"):
        studio.delete(job.id)
    job.stop()
    job.wait(120)
    assert job.status == "stopped"
    stopped_at = job.progress()[0]
    assert (tmp_path / job.id / MODEL_SUBDIR / "config.json").is_file()  # a stopped run saves its hard mask
    # an ended job has let go of its model copy and search; its run lives on disk
    assert job.pg is None and job.loaded is None and studio.get(job.id) is None
    assert job.history()["steps"][-1]["step"] == stopped_at

    again = studio.resume(job.id, lambda spec: embedded)
    assert again is not job and again.config == job.config
    wait_until(lambda: again.pg is not None and again.pg.step > stopped_at + 1)
    assert again.history()["steps"][stopped_at - 1]["step"] == stopped_at  # continued, not restarted
    again.stop()
    again.wait(120)
    studio.delete(job.id)
    assert studio.runs() == [] and not (tmp_path / job.id).exists()


def test_a_run_killed_with_its_process_shows_interrupted_and_resumes_from_disk(tmp_path, embedded):
    first = Studio(tmp_path)
    long = PruneConfig(method="pg", ratio=0.4, calib_windows=CALIB, pg=dataclasses.replace(TINY_PG, steps=10_000))
    job = first.start(embedded, long)
    wait_until(lambda: job.pg is not None and job.pg.step >= 3)
    job.pause()
    wait_until(lambda: job.status == "paused")
    # a new process: nothing in memory, the status on disk still says the run was going
    status = json.loads((tmp_path / job.id / "status.json").read_text())
    status["status"] = "running"
    (tmp_path / job.id / "status.json").write_text(json.dumps(status))
    second = Studio(tmp_path)
    assert second.runs()[0]["status"] == "interrupted"
    checkpointed = load_checkpoint(tmp_path / job.id).step
    job.stop()
    job.wait(120)
    resumed = second.resume(job.id, lambda spec: embedded)
    assert resumed is not job and resumed.config.ratio == 0.4
    wait_until(lambda: resumed.pg is not None and resumed.pg.step > checkpointed)
    assert resumed.history()["steps"][0]["step"] == 1  # history came back with the checkpoint
    resumed.stop()
    resumed.wait(120)


def test_metric_job_and_failed_job(tmp_path, embedded):
    studio = Studio(tmp_path)
    job = studio.start(embedded, PruneConfig(method="magnitude", ratio=0.5))
    job.wait(300)
    assert job.status == "finished" and job.report["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(PrunerError, match="only policy-gradient runs resume"):
        studio.resume(job.id, lambda spec: embedded)
    bad = studio.start(embedded, PruneConfig(method="pg", ratio=0.3, data=str(tmp_path / "missing.txt"), pg=TINY_PG))
    bad.wait(300)
    assert bad.status == "failed" and "missing.txt" in bad.error
    on_disk = {r["id"]: r for r in Studio(tmp_path).runs()}
    assert on_disk[bad.id]["status"] == "failed" and "missing.txt" in on_disk[bad.id]["error"]


@pytest.mark.parametrize("n, bins", [(1536, 64), (100, 64), (64, 64), (5, 5), (7, 3)])
def test_sorted_bins_are_the_means_of_consecutive_sorted_slices(n, bins):
    probs = torch.rand(n, generator=torch.Generator().manual_seed(n))
    ordered = probs.sort(descending=True).values
    edges = torch.linspace(0, n, bins + 1).round().long().tolist()
    plain = torch.stack([ordered[a:max(b, a + 1)].mean() for a, b in zip(edges[:-1], edges[1:])])
    torch.testing.assert_close(views.sorted_bins(probs, bins), plain)


def test_sorted_bins_and_heatmap_matrices():
    probs = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    torch.testing.assert_close(views.sorted_bins(probs, 3), torch.tensor([0.8, 0.4, 0.15]))
    snap = {"heads": [torch.tensor([0.2, 0.8]), torch.tensor([1.0])],
            "channels": [torch.arange(128.0) / 128, torch.ones(64)]}
    heads = views.heads_matrix(snap)
    assert heads.shape == (2, 2) and torch.isnan(heads[1, 1]) and heads[0, 1] == pytest.approx(0.8)
    chans = views.channels_matrix(snap, bins=64)
    assert chans.shape == (2, 64)
    assert chans[0, 0] == pytest.approx((127 + 126) / 2 / 128) and (chans[0, :-1] >= chans[0, 1:]).all()
    assert views.heatmap_png(chans, "t", "x").startswith(b"\x89PNG")


def test_curves_csv_and_eta():
    steps = [{"step": i, "losses": [1.0 * i, 2.0 * i], "loss_mean": 1.5 * i, "step_time_s": 2.0} for i in (1, 2)]
    rows = views.curves_csv(steps).splitlines()
    assert rows[0].split(",")[-2:] == ["loss_0", "loss_1"] and rows[2].split(",")[-2:] == ["2.0", "4.0"]
    assert views.eta_seconds(steps, 2, 10) == pytest.approx(16.0)
    assert views.format_duration(75) == "1:15" and views.format_duration(3725) == "1:02:05"
