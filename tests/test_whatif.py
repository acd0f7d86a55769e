"""The studio's What-if queue: one computation at a time, a newer wish list supersedes the queued one,
bounded results, and What-if work never overlapping a run; the real measurement against a direct one."""

import dataclasses
import threading
import time

import pytest
import torch

from pruner.config import PruneConfig
from pruner.errors import PrunerError
from pruner.evaluate import perplexity
from pruner.models import load_model
from pruner.pg.config import PGConfig
from pruner.prune import prune
from pruner.studio import Studio
from pruner.whatif import MALLOC_TRIM, WhatIf, WhatIfQueue, describe_state, wait_for
from pruner.windows import corpus_windows

LONG_PG = PGConfig(steps=10_000, samples=2, batch_size=1, seqlen=16, init="const", eval_every=1000,
                   eval_windows=1, snapshot_every=1000, checkpoint_every=1000)


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded", device="cpu", dtype="fp32")


def request(method="flap", ratio=0.3, granularity="kv_group"):
    return WhatIf.pruning("embedded", "cpu", "fp32", "brown", method, ratio, granularity)


def wait_until(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


class FakePrune:
    """A computation that records every start and end, how many ran at once, and what else was going;
    requests listed in `hold` block until `release()`."""

    def __init__(self, studio=None, hold=(), seconds=0.0):
        self.studio, self.hold, self.seconds = studio, set(hold), seconds
        self.lock, self.gate = threading.Lock(), threading.Event()
        self.inside, self.most_inside, self.started, self.ended, self.beside_a_run = 0, 0, [], [], []

    def release(self):
        self.gate.set()

    def __call__(self, req, loaded, windows):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.started.append(req)
        if self.studio is not None and self.studio.active() is not None:
            self.beside_a_run.append(req)
        if req in self.hold:
            assert self.gate.wait(60)
        time.sleep(self.seconds)
        with self.lock:
            self.inside -= 1
            self.ended.append((req, time.monotonic()))
        if req.method == "bad":
            raise PrunerError("no such method")
        return {"ppl": 10.0 + req.ratio, "achieved_ratio": req.ratio, "per_layer": [], "wall_time_s": 0.0}


def test_a_newer_wish_list_supersedes_the_queued_one_and_the_one_in_flight_finishes():
    a, b, c, d = request(ratio=0.3), request(ratio=0.35), request(ratio=0.4), request(ratio=0.45)
    fake = FakePrune(hold={a})
    queue = WhatIfQueue(compute=fake)
    queue.submit([a], None)
    wait_until(lambda: queue.state()["running"] == a)
    queue.submit([b, d], None)
    assert queue.state()["queued"] == [b, d]
    assert describe_state(queue.state()).startswith("Computing flap at ratio 0.30 (kv_group); next: flap at ratio 0.35")
    queue.submit([c, a, c], None)  # the slider moved on: b and d are dropped; a is in flight, c once
    assert queue.state()["queued"] == [c]
    fake.release()
    assert queue.wait_idle(60)
    assert fake.started == [a, c]  # b and d never computed
    assert queue.result(b) is None and queue.result(a)["ppl"] == pytest.approx(10.3)
    assert queue.result(c)["achieved_ratio"] == pytest.approx(0.4)
    queue.submit([a, c], None)  # known results are not computed again
    assert queue.wait_idle(5) and queue.computed == 2 and describe_state(queue.state()) == "Idle."


def test_never_two_computations_at_once_from_many_sessions():
    fake = FakePrune(seconds=0.01)
    queue = WhatIfQueue(compute=fake)

    def session(k):
        for i in range(30):
            queue.submit([request(ratio=round(0.05 + 0.01 * ((k * 7 + i) % 60), 2))], None)
            time.sleep(0.002)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert queue.wait_idle(60)
    assert fake.most_inside == 1 and len(fake.started) == len(set(fake.started)) == queue.computed
    assert queue.computed < 6 * 30  # superseded requests were never computed


def test_results_are_bounded_small_dicts_and_errors_are_results():
    fake = FakePrune()
    queue = WhatIfQueue(compute=fake, capacity=3)
    reqs = [request(ratio=r) for r in (0.1, 0.2, 0.3, 0.4, 0.5)]
    bad = request(method="bad")
    results = wait_for(queue, reqs[:2], None, timeout=60)
    assert [r["ppl"] for r in results] == pytest.approx([10.1, 10.2])
    wait_for(queue, reqs[2:] + [bad], None, timeout=60)  # four results wanted at once: all kept beyond the capacity
    assert queue.result(bad) == {"error": "no such method"}  # the worker went on after the failure
    assert [queue.result(r) is not None for r in reqs] == [False, False, True, True, True]
    # the line above read 0.3, 0.4, 0.5 last: least recently used now are `bad`, then 0.3
    queue.submit([bad], None)  # the wish list moved on: the least recently used are forgotten
    wait_for(queue, [reqs[0]], None, timeout=60)
    assert queue.result(bad) is None
    assert [queue.result(r) is not None for r in reqs] == [True, False, False, True, True]
    assert queue.computed == 7


def test_whatif_waits_for_a_run_and_a_run_waits_for_the_computation_in_flight(tmp_path, embedded):
    studio = Studio(tmp_path)
    a, b, c = request(ratio=0.3), request(ratio=0.5), request(ratio=0.6)
    fake = FakePrune(studio, hold={a})
    studio.whatif = WhatIfQueue(studio.whatif_slot, compute=fake)
    studio.whatif.submit([a, b], embedded)
    wait_until(lambda: studio.whatif.state()["running"] == a)
    # a run started while `a` is computed starts at once, but its thread waits for `a` before it copies
    # the model; `b` (queued) waits for the run
    job = studio.start(embedded, PruneConfig(method="pg", ratio=0.3, calib_windows=1, pg=LONG_PG))
    time.sleep(0.5)
    assert job.is_alive and job.status == "loading" and job.loaded is embedded and job.pg is None
    assert studio.whatif.state()["running"] == a and not fake.ended
    fake.release()
    wait_until(lambda: studio.whatif.state()["waiting_for"] == job.id)
    assert describe_state(studio.whatif.state()).startswith(f"Waiting for run `{job.id}` to end")
    studio.whatif.submit([c], embedded)  # still superseding while it waits
    wait_until(lambda: job.pg is not None and job.pg.step >= 2)
    assert job.loaded is not embedded  # its private copy, made once `a` had ended
    assert fake.started == [a] and studio.whatif.result(c) is None
    job.stop()
    job.wait(120)
    assert studio.whatif.wait_idle(60)
    assert fake.started == [a, c] and not fake.beside_a_run and fake.most_inside == 1
    assert studio.whatif.state()["waiting_for"] is None


def test_the_queue_measures_what_prune_and_perplexity_give(embedded):
    """The real computation (2 evaluation windows): the same numbers as pruning and evaluating directly."""
    torch.set_num_threads(1)
    queue = WhatIfQueue(eval_count=2)
    pruning, dense = request("magnitude", 0.4), WhatIf.dense("embedded", "cpu", "fp32", "brown")
    got, base = wait_for(queue, [pruning, dense], embedded)
    windows = corpus_windows(embedded.tokenizer, "brown", "validation", 128, 2)
    pruned, _, report = prune(embedded, PruneConfig(method="magnitude", ratio=0.4, calib_windows=32))
    assert got["ppl"] == perplexity(pruned, windows)["ppl"]
    assert base["ppl"] == perplexity(embedded.model, windows)["ppl"] < got["ppl"]
    assert got["achieved_ratio"] == report["achieved_ratio"] == pytest.approx(0.4, abs=0.02)
    assert got["per_layer"] == report["per_layer"] and set(got) == {"ppl", "achieved_ratio", "per_layer", "wall_time_s", "layer_errors"}
    assert got["layer_errors"] == []  # no reconstruction asked
    bad = dataclasses.replace(pruning, granularity="row")
    assert "unknown granularity 'row'" in wait_for(queue, [bad], embedded)[0]["error"]


def test_the_queue_measures_compare_cards_as_the_library_does(embedded, monkeypatch):
    """Compare's cards (2 evaluation windows): the dense card's parameters and perplexity are the
    model's; the Probe Pruning card is `dynamic_card` on a private copy (the shared model never hooked)
    with the history Compare's generation uses; timings are positive numbers."""
    from pruner.evaluate import total_params
    from pruner.models import private_copy
    from pruner.probe import GENERATION_HISTORY_SEQLEN, ProbeConfig, build_pruner, dynamic_card

    monkeypatch.setattr("pruner.whatif.PROBE_CALIB_WINDOWS", 4)  # a quick history
    torch.set_num_threads(1)
    queue = WhatIfQueue(eval_count=2)
    dense, probe = WhatIf.dense("embedded", "cpu", "fp32", "brown", card=True), WhatIf.probe("embedded", "cpu", "fp32", "brown", 0.4)
    assert dense != WhatIf.dense("embedded", "cpu", "fp32", "brown")  # a card is not the perplexity alone
    got_dense, got_probe = wait_for(queue, [dense, probe], embedded)
    windows = corpus_windows(embedded.tokenizer, "brown", "validation", 128, 2)
    assert got_dense["parameters"] == total_params(embedded.model)
    assert got_dense["perplexity"] == perplexity(embedded.model, windows)["ppl"]
    copy = private_copy(embedded)
    config = ProbeConfig(ratio=0.4, data="brown", calib_windows=4)
    want = dynamic_card(copy, build_pruner(copy, config, GENERATION_HISTORY_SEQLEN), windows)
    assert got_probe["parameters"] == want["parameters"] < 0.95 * got_dense["parameters"]
    assert got_probe["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert set(got_probe) == set(got_dense) == {"parameters", "perplexity", "prefill_s", "decode_tokens_per_s"}
    assert all(card[key] > 0 for card in (got_dense, got_probe) for key in ("prefill_s", "decode_tokens_per_s"))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in embedded.model.modules())
    assert "Probe Pruning at ratio 0.40" in probe.describe() and "size, perplexity" in dense.describe()


def test_memory_goes_back_to_the_system_after_each_computation():
    assert MALLOC_TRIM is not None  # glibc: freed arenas are returned with malloc_trim
