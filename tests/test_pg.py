"""Policy-gradient math on toy problems with known answers, and the run object's mechanics."""

import math

import pytest
import torch
from tiny_models import tiny_model

from pruner import pg_math
from pruner.adapters import adapter_for
from pruner.errors import PrunerError
from pruner.pg_run import PGConfig, PGRun, hard_mask, project_probs
from pruner.space import PruningSpace


def toy_loss(m: torch.Tensor, a: torch.Tensor, b: float) -> torch.Tensor:
    """L(m) = sum_i a_i m_i + b m_0 m_1, so dE[L]/ds_i = a_i + b (s_1 [i=0] + s_0 [i=1])."""
    return (m * a).sum(-1) + b * m[..., 0] * m[..., 1]


@pytest.mark.parametrize("estimator", ["exact", "reference"])
def test_estimator_is_unbiased_on_a_toy_objective(estimator):
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([0.3, 0.6, 0.5, 0.9, 0.1], dtype=torch.float64)
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    b = 1.5
    true = a.clone()
    true[0] += b * s[1]
    true[1] += b * s[0]
    if estimator == "reference":  # its score is the exact one times sqrt(s(1-s))
        true = true * (s * (1 - s)).sqrt()
    n = 400_000
    m = pg_math.sample_masks(s, n, g)
    losses = toy_loss(m, a, b)
    per_sample = pg_math.per_sample_gradients(losses, m, s, baseline=0.7, estimator=estimator)
    est = per_sample.mean(0)
    stderr = per_sample.std(0) / math.sqrt(n)
    assert ((est - true).abs() < 4 * stderr).all(), (est, true, stderr)


def test_reference_scaling_and_baseline_update():
    losses = torch.tensor([2.0, 4.0])
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([0.5, 0.5])
    g = pg_math.policy_gradient(losses, m, s, baseline=3.0, estimator="exact")
    # 1/(K-1) * [(-1)(0.5/0.25) + (1)(-0.5/0.25), (-1)(-0.5/0.25) + (1)(0.5/0.25)]
    torch.testing.assert_close(g, torch.tensor([-4.0, 4.0]), rtol=1e-6, atol=1e-6)
    assert pg_math.update_baseline(None, losses, 5) == 3.0
    assert pg_math.update_baseline(3.0, torch.tensor([8.0]), 5) == pytest.approx(0.8 * 3 + 0.2 * 8)
    assert pg_math.gradient_variance(torch.tensor([[1.0, 2.0], [3.0, 2.0]])) == pytest.approx(1.0)


@pytest.mark.parametrize("s, budget", [
    (torch.zeros(10), 3.0),                     # all zeros: already feasible
    (torch.ones(10), 3.0),                      # all ones: every unit ends at 0.3
    (torch.full((10,), 0.7), 2.5),              # ties
    (torch.tensor([2.0, -1.0, 0.5, 0.5, 1.5, 0.0]), 2.0),  # out of range on both sides
    (torch.linspace(0, 1, 1000) ** 3, 100.0),
])
def test_projection_hits_the_budget(s, budget):
    p = pg_math.project(s.double(), budget)
    assert (p >= 0).all() and (p <= 1).all()
    clipped_sum = float(s.clamp(0, 1).sum())
    if clipped_sum <= budget:
        torch.testing.assert_close(p, s.double().clamp(0, 1))
    else:
        assert abs(float(p.sum()) - budget) <= 1e-3
        order = torch.argsort(s, stable=True)  # order is preserved
        assert (p[order].diff() >= -1e-12).all()
    if torch.equal(s, torch.ones(10)):
        torch.testing.assert_close(p, torch.full((10,), 0.3, dtype=torch.float64), atol=1e-3, rtol=0)


def test_weighted_projection_hits_a_cost_budget():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(200, generator=g, dtype=torch.float64)
    c = torch.cat([torch.full((20,), 50.0), torch.ones(180)]).double()
    p = pg_math.project(s, 0.4 * float(c.sum()) * 0.5, c)
    assert abs(float((p * c).sum()) - 0.2 * float(c.sum())) <= 1e-3 * 50


def test_schedule_and_inits():
    assert pg_math.cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert pg_math.cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert pg_math.cosine_lr(100, 100, 0.1) == pytest.approx(0.0)
    metric = torch.arange(10.0)
    s = pg_math.init_probs(metric, 0.7, "sigmap")
    assert float(s.mean()) == pytest.approx(0.7, abs=0.02) and (s.diff() > 0).all()
    c = pg_math.init_probs(metric, 0.7, "const", const=0.9)
    assert c.tolist() == [pytest.approx(0.1)] * 3 + [pytest.approx(0.9)] * 7
    n = pg_math.init_probs(metric, 0.5, "norm")
    torch.testing.assert_close(n, torch.linspace(0, 1, 10, dtype=torch.float64))
    r = pg_math.init_probs(metric, 0.5, "random", generator=torch.Generator().manual_seed(0))
    assert float(r.mean()) == pytest.approx(0.5, abs=0.05)
    assert pg_math.entropy(torch.tensor([0.5])) == pytest.approx(math.log(2))


class SyntheticRun(PGRun):
    """A PGRun whose loss is synthetic: units in `important` cost 1.0 each when dropped, others 0.01."""

    important: torch.Tensor

    def sample_losses(self, masks, batch):
        weights = torch.full((masks.shape[1],), 0.01, dtype=torch.float64)
        weights[self.important] = 1.0
        noise = 0.05 * torch.randn(masks.shape[0], generator=torch.Generator().manual_seed(self.step), dtype=torch.float64)
        return ((1 - masks.double()) * weights).sum(1) + noise


def make_run(cls=PGRun, ratio=0.5, steps=4, granularity="kv_group", run_dir=None, fill=None,
             bias_compensation=False, **pg):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, granularity)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 97, (16, 12), generator=g)
    valid = torch.randint(0, 97, (2, 12), generator=g)
    config = PGConfig(steps=steps, batch_size=2, seqlen=12, eval_every=2, eval_windows=2, snapshot_every=2,
                      checkpoint_every=2, bias_compensation=bias_compensation, **pg)
    return cls(model, adapter, space, ratio, config, seed=0, blocks=blocks, valid=valid, run_dir=run_dir, fill=fill)


def test_pg_finds_the_units_that_matter():
    run = make_run(SyntheticRun, ratio=0.5, steps=300, init="random", lr=0.05)
    n_h = len(run.s_h)
    important_channels = torch.tensor([0, 5, 17, 41, 60, 77, 90, 101])  # channel units across layers
    run.important = n_h + important_channels
    run.run()
    mask = run.current_mask()
    kept_channels = torch.cat(list(mask.channels))
    assert kept_channels[important_channels].all()
    assert float(run.s_c[important_channels].min()) > 0.95
    assert run.history.steps[-1]["expected_kept_fraction"] <= 0.5 + 1e-3


def test_projection_and_hard_mask_hold_the_budget_for_every_form():
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    for granularity in ("kv_group", "query_head"):
        space = PruningSpace.from_model(model, adapter, granularity)
        costs = space.unit_costs()
        g = torch.Generator().manual_seed(1)
        for budget in ("separate", "joint"):
            for scope in ("global", "per_layer"):
                s_h = torch.rand(len(costs[0]), generator=g, dtype=torch.float64) + 0.5
                s_c = torch.rand(len(costs[1]), generator=g, dtype=torch.float64) + 0.5
                p_h, p_c = project_probs(space, s_h, s_c, 0.6, budget, scope, costs)
                total = float((p_h * costs[0]).sum() + (p_c * costs[1]).sum())
                assert total <= 0.6 * float(costs[0].sum() + costs[1].sum()) * (1 + 1e-3)
                mask = hard_mask(space, p_h, p_c, 0.6, budget, scope)
                kept = space.kept_params(mask)
                dense = space.decoder_linear_params()
                assert kept <= 0.6 * dense + (0.1 * dense if granularity == "query_head" else 1)
                assert kept >= 0.45 * dense


def test_run_records_history_and_pauses_and_stops(tmp_path):
    run = make_run(steps=6, run_dir=tmp_path / "run")
    run.pause()
    run.start()
    import time

    time.sleep(0.3)
    assert run.status == "paused" and run.step == 0
    run.resume()
    run.wait(60)
    assert run.status == "finished" and run.step == 6
    h = run.history.read()
    assert len(h["steps"]) == 6 and len(h["evals"]) == 3 and len(h["snapshots"]) == 4  # step 0, 2, 4, 6
    step = h["steps"][-1]
    for key in ("losses", "baseline", "grad_variance", "heads_mean", "channels_entropy", "expected_kept_fraction",
                "lr", "tokens_per_s"):
        assert key in step
    assert len(step["losses"]) == 2
    assert (tmp_path / "run" / "checkpoint.pt").is_file()

    stopper = make_run(steps=500, run_dir=tmp_path / "run2")
    stopper.start()
    time.sleep(0.5)
    stopper.stop()
    stopper.wait(60)
    assert stopper.status == "stopped" and 0 < stopper.step < 500


def test_resume_equals_uninterrupted(tmp_path):
    whole = make_run(steps=6)
    whole.run()
    part = make_run(steps=6, run_dir=tmp_path / "r")
    part.stop()  # stop before the first step: then run 4 steps by hand below
    part._stop.clear()
    for _ in range(4):
        part.history.append("steps", part.do_step())
    part.checkpoint()
    resumed = make_run(steps=6, run_dir=tmp_path / "r")
    assert resumed.load_checkpoint() and resumed.step == 4
    resumed.run()
    assert torch.equal(resumed.s_h, whole.s_h) and torch.equal(resumed.s_c, whole.s_c)
    assert [r["losses"] for r in resumed.history.steps] == [r["losses"] for r in whole.history.steps]


@pytest.mark.parametrize("bad", [dict(samples=1), dict(window=0), dict(steps=0), dict(estimator="nope"),
                                 dict(budget="x"), dict(scope="x"), dict(init="x"), dict(lr=0)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(PrunerError, match="bad policy-gradient setting"):
        PGConfig(**bad).validate()


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    run = make_run(steps=2, run_dir=tmp_path / "r")
    run.run()
    other = make_run(steps=3, run_dir=tmp_path / "r")
    with pytest.raises(PrunerError, match="other settings"):
        other.load_checkpoint()


def test_sigkilled_run_resumes_on_the_same_trajectory(tmp_path):
    """A run killed with SIGKILL mid-way continues from its checkpoint exactly as if never killed."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir = tmp_path / "run"
    script = (
        "import sys, time; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "from test_pg import make_run\n"
        "run = make_run(steps=30, run_dir=%r)\n"
        "run.run(progress=lambda record: time.sleep(0.15))\n"
    ) % (str(Path(__file__).parent), str(Path(__file__).parent.parent), str(run_dir))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            status = run_dir / "status.json"
            if status.is_file() and (run_dir / "checkpoint.pt").is_file():
                if json.loads(status.read_text())["step"] >= 6:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = make_run(steps=30, run_dir=run_dir)
    assert resumed.load_checkpoint() and 6 <= resumed.step < 30
    resumed.run()
    whole = make_run(steps=30)
    whole.run()
    assert torch.equal(resumed.s_h, whole.s_h) and torch.equal(resumed.s_c, whole.s_c)
    assert resumed.baseline == whole.baseline
    assert [r["losses"] for r in resumed.history.steps] == [r["losses"] for r in whole.history.steps]


@pytest.mark.parametrize("compensate", [False, True])
def test_bias_compensation_scores_mean_filled_masks_and_saves_the_bias(monkeypatch, compensate):
    from types import SimpleNamespace

    from pruner import methods
    from pruner.calibration import collect_input_stats, input_means
    from pruner.pg_run import selection_of

    plain = make_run(steps=2)
    stats = collect_input_stats(plain.model, plain.adapter, plain.blocks[:4])
    fill = input_means(stats)
    if compensate:
        with pytest.raises(PrunerError, match="calibration means"):
            make_run(steps=2, bias_compensation=True)
    run = make_run(steps=2, bias_compensation=compensate, fill=fill)
    masks = torch.ones(2, len(run.s_h) + len(run.s_c))
    masks[:, ::2] = 0
    same = torch.equal(run.sample_losses(masks, run.batch_at(0)), plain.sample_losses(masks, plain.batch_at(0)))
    assert same != compensate  # mean-filled channels change every loss
    run.run()
    monkeypatch.setattr(methods, "calibration_stats", lambda loaded, config: stats)
    loaded = SimpleNamespace(model=run.model, adapter=run.adapter)
    selection = selection_of(run, loaded, config=None)
    mask = run.current_mask()
    assert all(torch.equal(a, b) for a, b in zip(selection.mask.channels, mask.channels))
    expected = methods.bias_compensation(loaded, run.space, mask, stats) if compensate else []
    assert len(selection.bias_updates) == len(expected)
    for (l, which, delta), (l2, which2, delta2) in zip(selection.bias_updates, expected):
        assert (l, which) == (l2, which2) and torch.equal(delta, delta2)
