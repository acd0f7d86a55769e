"""Policy-gradient math on toy problems with known answers, and the run object's mechanics."""

import math

import pytest
import torch
from tiny_models import tiny_model

from pruner import pg_math
from pruner.adapters import adapter_for
from pruner.errors import PrunerError
from pruner.pg.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT
from pruner.pg.config import PGConfig
from pruner.pg.run import PGRun
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


@pytest.mark.parametrize("estimator", ["exact", "reference"])
@pytest.mark.parametrize("baseline_kind", ["moving", "loo", "none"])
@pytest.mark.parametrize("k", [2, 3])
def test_one_whole_step_matches_its_exact_expectation_by_enumeration(estimator, baseline_kind, k):
    """E[s_new] over every K-tuple of masks of 3 units equals s - lr * c * dE[L]/ds, where
    c = (K - 1/T) / (K - 1) with the moving baseline (it holds this step's losses with weight 1/T),
    1 with leave-one-out, K / (K - 1) with none; the reference score adds sqrt(s(1-s)) per unit."""
    import itertools

    s = torch.tensor([0.3, 0.6, 0.8], dtype=torch.float64)
    a, b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 1.5
    window, lr, previous = 5, 0.1, 0.7
    masks = [torch.tensor(m, dtype=torch.float64) for m in itertools.product([0.0, 1.0], repeat=3)]
    expected_s = torch.zeros(3, dtype=torch.float64)
    for pair in itertools.product(masks, repeat=k):
        m = torch.stack(pair)
        prob = float(torch.prod(torch.where(m == 1, s, 1 - s)))
        s_new, _, _ = pg_math.pg_step(s, m, toy_loss(m, a, b), previous, lr, estimator=estimator, window=window,
                                      baseline_kind=baseline_kind)
        expected_s += prob * s_new
    true = a.clone()
    true[0] += b * s[1]
    true[1] += b * s[0]
    scale = {"moving": (k - 1 / window) / (k - 1), "loo": 1.0, "none": k / (k - 1)}[baseline_kind]
    if estimator == "reference":
        true = true * (s * (1 - s) + 1e-8).sqrt()
    torch.testing.assert_close(expected_s, s - lr * scale * true, rtol=1e-6, atol=1e-9)


def pair_states(s: torch.Tensor):
    """Every (b, b~) of one antithetic pair over the units of `s`, with its probability:
    per unit P(1,1) = max(0, 2s-1), P(1,0) = P(0,1) = min(s, 1-s), P(0,0) = max(0, 1-2s)."""
    import itertools

    per_unit = [[((1.0, 1.0), max(0.0, 2 * p - 1)), ((1.0, 0.0), min(p, 1 - p)), ((0.0, 1.0), min(p, 1 - p)),
                 ((0.0, 0.0), max(0.0, 1 - 2 * p))] for p in s.tolist()]
    for combo in itertools.product(*per_unit):
        prob = math.prod(p for _, p in combo)
        if prob > 0:
            yield torch.tensor([[b for (b, _), _ in combo], [a for (_, a), _ in combo]], dtype=s.dtype), prob


def test_antithetic_pairs_are_bernoulli_and_disagree_as_much_as_they_can():
    s = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    n = 200_000
    m = pg_math.sample_masks(s, 2 * n, torch.Generator().manual_seed(1), "antithetic")
    stderr = (s * (1 - s) / n).sqrt()
    for rows in (m[0::2], m[1::2]):  # each member of the pair is Bernoulli(s)
        assert ((rows.mean(0) - s).abs() < 5 * stderr).all()
    disagree = (m[0::2] != m[1::2]).double().mean(0)
    torch.testing.assert_close(disagree, 2 * torch.minimum(s, 1 - s), atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="even"):
        pg_math.sample_masks(s, 3, torch.Generator(), "antithetic")


@pytest.mark.parametrize("estimator", ["exact", "reference"])
@pytest.mark.parametrize("pairs", [1, 2])
def test_antithetic_step_matches_its_exact_expectation_by_enumeration(estimator, pairs):
    """DisARM is unbiased: E[s_new] over every state of the K/2 pairs equals s - lr dE[L]/ds, with no
    baseline, whatever the baseline knob says; the reference score adds sqrt(s(1-s)) per unit."""
    import itertools

    s = torch.tensor([0.3, 0.6, 0.8], dtype=torch.float64)
    a, b, lr = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 1.5, 0.1
    true = a.clone()
    true[0] += b * s[1]
    true[1] += b * s[0]
    if estimator == "reference":
        true = true * (s * (1 - s) + 1e-8).sqrt()
    states = list(pair_states(s))
    for baseline_kind in ("moving", "none"):
        expected_s = torch.zeros(3, dtype=torch.float64)
        for combo in itertools.product(states, repeat=pairs):
            m = torch.cat([pair for pair, _ in combo])
            prob = math.prod(p for _, p in combo)
            s_new, _, _ = pg_math.pg_step(s, m, toy_loss(m, a, b) + 7.0, 0.7, lr, estimator=estimator,
                                          baseline_kind=baseline_kind, sampling="antithetic")
            expected_s += prob * s_new
        torch.testing.assert_close(expected_s, s - lr * true, rtol=1e-6, atol=1e-9)


def test_antithetic_pairs_vary_less_than_leave_one_out_on_a_toy_objective():
    """Exact variance (summed over units) of the K=2 gradient by enumeration: the DisARM pair is
    below the leave-one-out pair of independent masks on an additive loss with an interaction."""
    import itertools

    s = torch.tensor([0.3, 0.6, 0.8, 0.5], dtype=torch.float64)
    a, b = torch.tensor([1.0, -2.0, 0.5, 0.2], dtype=torch.float64), 1.5

    def variance(outcomes):
        mean = sum(p * g for g, p in outcomes)
        return float(sum(p * ((g - mean) ** 2).sum() for g, p in outcomes))

    singles = [(torch.tensor(m, dtype=torch.float64), float(torch.prod(torch.where(torch.tensor(m) == 1, s, 1 - s))))
               for m in itertools.product([0.0, 1.0], repeat=4)]
    loo = [(pg_math.pg_step(s, torch.stack([m1, m2]), toy_loss(torch.stack([m1, m2]), a, b), None, 1.0,
                            estimator="exact", baseline_kind="loo")[2].sum(0), p1 * p2)
           for (m1, p1), (m2, p2) in itertools.product(singles, repeat=2)]
    disarm = [(pg_math.disarm_gradients(toy_loss(m, a, b), m, s, "exact")[0], p) for m, p in pair_states(s)]
    assert variance(disarm) < 0.85 * variance(loo), (variance(disarm), variance(loo))


@pytest.mark.parametrize("sampling", ["independent", "antithetic"])
def test_the_run_composes_its_step_from_pg_step_and_the_projection(monkeypatch, sampling):
    """do_step's new probabilities are exactly pg_step's on the masks it sampled, projected."""
    run = make_run(steps=5, lr=0.2, window=3, sampling=sampling)
    captured = {}
    real_sample = pg_math.sample_masks

    def sample(s, k, generator, how):
        assert how == sampling
        captured["masks"] = real_sample(s, k, generator, how)
        return captured["masks"]

    monkeypatch.setattr(pg_math, "sample_masks", sample)
    run.do_step()  # the first step sets the baseline; check the second, with a baseline
    s_before, baseline_before = torch.cat([run.s_h, run.s_c]), run.baseline
    real_losses = run.sample_losses
    monkeypatch.setattr(run, "sample_losses", lambda masks, batch: captured.setdefault("losses", real_losses(masks, batch)))
    run.do_step()
    lr = pg_math.cosine_lr(1, 5, 0.2)
    s_new, baseline, _ = pg_math.pg_step(s_before, captured["masks"], captured["losses"], baseline_before, lr,
                                         estimator="reference", window=3, sampling=sampling)
    n_h = len(run.s_h)
    p_h, p_c = run.project(s_new[:n_h], s_new[n_h:])
    assert run.baseline == baseline
    torch.testing.assert_close(run.s_h, p_h, rtol=0, atol=0)
    torch.testing.assert_close(run.s_c, p_c, rtol=0, atol=0)


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
    kept = torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 1, 1, 1])  # a method's own mask
    m = pg_math.init_probs(kept, 0.7, "mask", const=0.8)  # d = 0.6: 0.7 + 0.3 d, 0.7 - 0.7 d
    assert m.tolist() == [pytest.approx(0.88 if k else 0.28) for k in kept.tolist()]
    assert float(m.mean()) == pytest.approx(0.7)  # the mask keeps 7 of 10: already at the budget
    assert pg_math.init_probs(kept, 0.5, "mask", const=0.9).tolist() == [
        pytest.approx(0.9 if k else 0.1) for k in kept.tolist()]
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
    holdout = torch.randint(0, 97, (2, 12), generator=g)
    config = PGConfig(**{"steps": steps, "batch_size": 2, "seqlen": 12, "eval_every": 2, "eval_windows": 2,
                         "snapshot_every": 2, "checkpoint_every": 2, "bias_compensation": bias_compensation, **pg})
    return cls(model, adapter, space, ratio, config, seed=0, blocks=blocks, valid=valid, run_dir=run_dir, fill=fill,
               holdout=holdout)


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


def wait_until(predicate, timeout=60.0):
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_run_records_history_and_pauses_and_stops(tmp_path):
    statuses = []
    run = make_run(steps=6, run_dir=tmp_path / "run")
    run.on_status = lambda r: statuses.append((r.status, r.step))
    run.pause()
    run.start()
    wait_until(lambda: run.status == "paused")
    assert run.step == 0
    run.resume()
    run.wait(60)
    assert run.status == "finished" and run.step == 6
    assert statuses[0] == ("running", 0) and ("paused", 0) in statuses and statuses[-1] == ("finished", 6)
    h = run.history.read()
    assert [r["step"] for r in h["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in h["evals"]] == [2, 4, 6] and all(e["ppl"] > 1 for e in h["evals"])
    assert [snap["step"] for snap in h["snapshots"]] == [0, 2, 4, 6]
    for record in h["steps"]:
        losses = torch.tensor(record["losses"])
        assert len(losses) == 2 and bool(torch.isfinite(losses).all())
        assert record["loss_mean"] == pytest.approx(float(losses.mean()))
        assert record["expected_kept_fraction"] <= 0.5 + 1e-3
        assert 0 <= record["heads_min"] <= record["heads_mean"] <= record["heads_max"] <= 1
        assert record["lr"] == pytest.approx(pg_math.cosine_lr(record["step"] - 1, 6, run.config.lr))
    assert h["steps"][0]["baseline"] == pytest.approx(h["steps"][0]["loss_mean"])  # first step: the mean
    assert (tmp_path / "run" / CHECKPOINT).is_file()

    stopper = make_run(steps=500, run_dir=tmp_path / "run2")
    stopper.start()
    wait_until(lambda: stopper.step >= 2)
    stopper.stop()
    stopper.wait(60)
    assert stopper.status == "stopped" and 2 <= stopper.step < 500


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


def test_each_step_records_the_spread_of_its_estimates():
    """Independent masks: the variance across the K per-sample estimates and their mean square; one
    antithetic pair: no variance to measure, its mean square all the same."""
    for sampling, k in (("independent", 3), ("antithetic", 2)):
        run = make_run(steps=3, sampling=sampling, samples=k)
        captured = {}
        real = pg_math.pg_step
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pg_math, "pg_step", lambda *a, **kw: captured.setdefault("out", real(*a, **kw)))
            record = run.do_step()
        per_sample = captured["out"][2]
        assert record["grad_mean_square"] == pytest.approx(float(per_sample.pow(2).mean()))
        assert record["grad_mean_square"] > 0
        if sampling == "independent":
            assert record["grad_variance"] == pytest.approx(float(per_sample.var(0).mean()))
        else:
            assert per_sample.shape[0] == 1 and record["grad_variance"] is None


def test_antithetic_sampling_needs_an_even_k():
    with pytest.raises(PrunerError, match="pairs"):
        PGConfig(samples=3, sampling="antithetic").validate()
    PGConfig(samples=4, sampling="antithetic").validate()


def test_a_run_saved_before_a_knob_existed_resumes_as_it_ran(tmp_path):
    """A checkpoint and settings written without `sampling` read back as independent sampling."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from pruner.config import PruneConfig
    from pruner.pg.checkpoint import META_KEY

    run = make_run(steps=2, run_dir=tmp_path / "r", sampling="independent")  # as runs before the knob sampled
    run.run()
    path = tmp_path / "r" / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["config"]["sampling"]
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    assert make_run(steps=2, run_dir=tmp_path / "r", sampling="independent").load_checkpoint()
    with pytest.raises(PrunerError, match="other settings"):  # not as today's default
        make_run(steps=2, run_dir=tmp_path / "r").load_checkpoint()
    settings = PruneConfig(method="pg").to_dict()
    del settings["pg"]["sampling"]
    assert PruneConfig.from_dict(settings).pg.sampling == "independent"


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
        "run.on_status = lambda r: open(%r, 'w').write(str(r.step))\n"
        "run.run(progress=lambda record: time.sleep(0.15))\n"
    ) % (str(Path(__file__).parent), str(Path(__file__).parent.parent), str(run_dir), str(tmp_path / "step"))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            step = tmp_path / "step"
            if (run_dir / CHECKPOINT).is_file() and step.is_file() and step.read_text() and int(step.read_text()) >= 6:
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
    assert (resumed.best["step"], resumed.best["ppl"]) == (whole.best["step"], whole.best["ppl"])
    assert torch.equal(resumed.best["mask"], whole.best["mask"])


@pytest.mark.parametrize("compensate", [False, True])
def test_bias_compensation_scores_mean_filled_masks_and_saves_the_bias(compensate):
    from pruner.calibration import collect_input_stats, input_means
    from pruner.methods.pg import selection_of

    plain = make_run(steps=2)
    fill = input_means(collect_input_stats(plain.model, plain.adapter, plain.blocks[:4]))
    if compensate:
        with pytest.raises(PrunerError, match="calibration means"):
            make_run(steps=2, bias_compensation=True)
    run = make_run(steps=2, bias_compensation=compensate, fill=fill)
    masks = torch.ones(2, len(run.s_h) + len(run.s_c))
    masks[:, ::2] = 0
    same = torch.equal(run.sample_losses(masks, run.batch_at(0)), plain.sample_losses(masks, plain.batch_at(0)))
    assert same != compensate  # mean-filled channels change every loss
    run.run()
    selection = selection_of(run)
    assert selection.compensate == compensate
    assert all(torch.equal(a, b) for a, b in zip(selection.mask.channels, run.result_mask().channels))


@pytest.mark.parametrize("bad", [dict(lr=float("inf")), dict(penalty=float("nan")), dict(lr=1e9)])
def test_non_finite_settings_or_updates_fail_the_run_with_a_message(bad, tmp_path):
    if bad.get("lr") == 1e9:  # finite but absurd: caught by its bound
        with pytest.raises(PrunerError, match="lr"):
            PGConfig(**bad).validate()
        return
    with pytest.raises(PrunerError, match="bad policy-gradient setting"):
        PGConfig(**bad).validate()


def test_a_non_finite_loss_stops_the_run_as_failed(tmp_path):
    run = make_run(steps=4, run_dir=tmp_path / "r")
    run.sample_losses = lambda masks, batch: torch.tensor([1.0, float("nan")], dtype=torch.float64)
    with pytest.raises(PrunerError, match="non-finite loss"):
        run.run()
    assert run.status == "failed" and "non-finite" in run.error and run.step == 0


def test_a_crafted_pickle_checkpoint_is_never_opened(tmp_path):
    """A checkpoint.pt that would run code when unpickled is refused unread."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / LEGACY_CHECKPOINT).write_bytes(pickle.dumps({"settings": Exploit()}))
    run = make_run(steps=2, run_dir=run_dir)
    with pytest.raises(PrunerError, match="pickle"):
        run.load_checkpoint()
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_meta", "out_of_range"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    import json as _json

    from safetensors.torch import load_file, save_file

    run = make_run(steps=2, run_dir=tmp_path / "r", sampling="independent")  # as runs before the knob sampled
    run.run()
    path = tmp_path / "r" / CHECKPOINT
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        if damage == "bad_meta":
            meta = {"pruner_checkpoint": _json.dumps({"format": 1, "step": "two"})}
        else:
            tensors["s_h"] = tensors["s_h"] + 5
        save_file(tensors, str(path), metadata=meta)
    fresh = make_run(steps=2, run_dir=tmp_path / "r")
    with pytest.raises(PrunerError, match="damaged"):
        fresh.load_checkpoint()


def holdout_ppl_of(run: PGRun, mask) -> float:
    """exp(mean NLL) of the held-out blocks under `mask`, through the plain masked forward."""
    from pruner.evaluate import window_losses
    from pruner.masking import masked

    with masked(run.model, run.adapter, run.space, mask, run.fill):
        return math.exp(float(window_losses(run.model, run.holdout).double().mean()))


@pytest.mark.parametrize("result", ["best", "last"])
def test_the_result_is_the_lowest_held_out_hard_mask_scored_or_the_last(result):
    """result=best returns, of the hard masks at the start and at every evaluation, the one whose
    held-out perplexity (recomputed here with masked forwards) is lowest; result=last the final one."""
    from pruner.budget import hard_mask

    run = make_run(steps=8, lr=0.5, init="random", sampling="independent", samples=3, eval_every=1,
                   snapshot_every=1, result=result)
    run.run()
    candidates = [hard_mask(run.space, torch.cat(snap["heads"]).double(), torch.cat(snap["channels"]).double(),
                            run.keep, run.config.budget, run.config.scope) for snap in run.history.snapshots]
    ppl = [holdout_ppl_of(run, m) for m in candidates]
    assert len(set(ppl)) > 1  # the search moved: the choice is not trivial
    assert [e["holdout_ppl"] for e in run.history.evals] == pytest.approx(ppl[1:], rel=1e-5)
    chosen = candidates[min(range(len(ppl)), key=ppl.__getitem__)] if result == "best" else run.current_mask()
    got = run.result_mask()
    assert all(torch.equal(a, b) for a, b in zip(got.heads + got.channels, chosen.heads + chosen.channels))
    assert run.best["ppl"] == pytest.approx(min(ppl), rel=1e-5)


def test_held_out_blocks_are_never_a_batch():
    from pruner.pg.run import hold_out

    blocks = torch.arange(40).view(10, 4)
    search, held = hold_out(blocks, 3)
    assert torch.equal(torch.cat([search, held]), blocks) and len(held) == 3
    run = make_run(steps=2)
    run.blocks, run.holdout = search, held
    seen = torch.cat([run.batch_at(step) for step in range(50)])
    assert not bool(torch.isin(seen, held).any())
    assert hold_out(blocks, 0) == (blocks, None)
    with pytest.raises(PrunerError, match="too short"):
        hold_out(blocks, 10)


def test_result_best_needs_held_out_blocks():
    with pytest.raises(PrunerError, match="holdout_blocks"):
        PGConfig(result="best", holdout_blocks=0).validate()
    PGConfig(result="last", holdout_blocks=0).validate()
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    blocks, valid = torch.zeros(4, 12, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long)
    with pytest.raises(PrunerError, match="held-out"):
        PGRun(model, adapter, space, 0.5, PGConfig(bias_compensation=False), seed=0, blocks=blocks, valid=valid)


def test_the_best_mask_survives_a_checkpoint_and_old_checkpoints_have_none(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from pruner.pg.checkpoint import META_KEY, load_checkpoint

    run = make_run(steps=4, run_dir=tmp_path / "r", lr=0.5, init="random")
    run.run()
    ckpt = load_checkpoint(tmp_path / "r")
    assert (ckpt.best["step"], ckpt.best["ppl"]) == (run.best["step"], run.best["ppl"])
    assert torch.equal(ckpt.best["mask"], run.best["mask"]) and ckpt.best["mask"].dtype == torch.bool
    resumed = make_run(steps=4, run_dir=tmp_path / "r", lr=0.5, init="random")
    assert resumed.load_checkpoint()
    assert all(torch.equal(a, b) for a, b in zip(resumed.result_mask().channels, run.result_mask().channels))
    path = tmp_path / "r" / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:  # as written before the best was kept
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "best_mask"}
    del meta["best"]
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    assert load_checkpoint(tmp_path / "r").best is None
    meta["best"] = {"step": 1, "ppl": 2.0}  # a record without its mask is damage
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(PrunerError, match="damaged"):
        load_checkpoint(tmp_path / "r")
