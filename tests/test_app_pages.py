"""Every studio page in-process with Streamlit's AppTest: widgets, state and errors."""

import contextlib
import re
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNER_RUNS_DIR", str(tmp_path / "runs"))
    import app_pages.common as common

    common.studio.clear()  # a fresh run manager on the temporary folder
    yield tmp_path / "runs"
    manager = common.studio()
    if manager.active():
        manager.active().stop()
        manager.active().wait(120)
    manager.whatif.submit([], None)  # drop what pages queued; the computation in flight ends (its thread
    assert manager.whatif.wait_idle(600)  # must not be inside torch when the interpreter exits)
    common.studio.clear()


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / name), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def by_label(elements, label):
    return next(e for e in elements if e.label == label)


def charts(at: AppTest) -> list[str]:
    """The SVG of every chart the page drew (app_pages.common.draw)."""
    return [m.value for m in at.markdown if m.value.startswith("<svg")]


def test_app_navigation_opens_on_the_model_page():
    at = page("app.py")
    assert at.title[0].value == "Model & data"
    assert "embedded" in texts(at)


def test_every_page_icon_has_a_local_favicon():
    """app.py turns each page's ":material/<name>:" icon into app_pages/icons/<name>.svg for the browser tab."""
    names = re.findall(r'icon=":material/(\w+):"', (ROOT / "app.py").read_text())
    pages = [p for p in (ROOT / "app_pages").glob("*.py") if p.name not in ("__init__.py", "common.py", "charts.py")]
    assert len(names) == len(pages)
    for name in names:
        assert (ROOT / "app_pages" / "icons" / f"{name}.svg").read_text().startswith("<svg"), name


def test_model_page_summary_and_bad_choices():
    at = page("app_pages/model.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers"] == "30" and metrics["KV heads"] == "3" and metrics["Head dim"] == "64"
    assert at.dataframe[0].value.shape[0] == 30
    at.radio[0].set_value("local")
    at.text_input[0].set_value("/no/such/model")
    at.button[0].click().run()  # the form's submit button
    assert any("/no/such/model" in e.value for e in at.error)
    assert at.session_state["model_spec"] == "embedded"  # nothing changed
    at.radio[0].set_value("embedded")
    at.selectbox[0].set_value("text file")
    at.text_input[1].set_value("/no/such/file.txt")
    at.button[0].click().run()
    assert any("file.txt" in e.value for e in at.error)


def start_run(at: AppTest, method: str, **numbers) -> AppTest:
    by_label(at.selectbox, "Method").set_value(method).run()
    for label, value in numbers.items():
        by_label(at.number_input, label).set_value(value)
    by_label(at.button, "Start").click().run()
    assert not at.exception, at.exception
    return at


def wait_for_status(at: AppTest, wanted: tuple[str, ...], timeout: float = TIMEOUT) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        at.run()
        status = next((m.value for m in at.markdown if m.value.split("**")[-2:-1] and "Run `" in m.value), "")
        for word in wanted:
            if f"**{word}**" in status:
                return word
        time.sleep(0.5)
    raise AssertionError(f"status never became one of {wanted}: {texts(at)}")


def test_prune_page_metric_run_exports_and_one_run_at_a_time():
    at = page("app_pages/prune.py")
    assert [b.label for b in at.button] == ["Start", "Pause", "Resume", "Stop"]
    start_run(at, "magnitude")
    run_id = at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]
    assert wait_for_status(at, ("finished", "failed")) == "finished"
    labels = [b.label for b in at.get("download_button")]
    assert "Report (JSON)" in labels
    assert any("Pruned model saved" in s.value for s in at.success)

    start_run(at, "pg", Steps=10_000, **{"Batch size": 1, "Sequence length": 16, "Calibration windows": 1})
    second = at.query_params["run"]
    assert second != run_id
    by_label(at.button, "Start").click().run()
    assert any("one heavy run at a time" in e.value for e in at.error)
    assert wait_for_status(at, ("running",)) == "running"
    by_label(at.button, "Stop").click().run()
    assert wait_for_status(at, ("stopped",)) == "stopped"

    runs = page("app_pages/runs.py")
    table = runs.dataframe[0].value
    assert set(table["status"]) == {"finished", "stopped"} and len(table) == 2


def test_prune_page_shows_an_unknown_run_clearly():
    at = AppTest.from_file(str(ROOT / "app_pages/prune.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = "no-such-run"
    at.run()
    assert any("no-such-run" in w.value for w in at.warning)


def test_compare_page_generates_with_both_models_and_probe_pruning():
    import app_pages.common as common

    at = page("app_pages/prune.py")
    start_run(at, "magnitude")
    wait_for_status(at, ("finished",))
    queue = common.studio().whatif
    assert queue.wait_idle(TIMEOUT)  # the Prune page's perplexity of the finished run
    before = queue.computed
    cmp = page("app_pages/compare.py")
    assert "-magnitude-r30-" in by_label(cmp.selectbox, "Pruned model").value
    by_label(cmp.slider, "New tokens").set_value(8)
    by_label(cmp.button, "Generate").click().run()
    assert not cmp.exception, cmp.exception
    generated = [c for c in cmp.markdown if c.value.strip()]  # the two streamed generations stay on reruns
    run_until(cmp, lambda at: len(at.dataframe) == 1)  # the cards come from the What-if queue
    assert [m.value for m in cmp.markdown if m.value.strip()][-2:] == [m.value for m in generated][-2:]
    table = cmp.dataframe[0].value
    assert table.loc["parameters", "pruned / dense"] < 0.9
    assert list(table.columns) == ["dense", "pruned", "pruned / dense"]
    assert queue.computed - before == 2  # the dense and the pruned card, in the queue's worker

    by_label(cmp.toggle, "Probe Pruning too").set_value(True).run()
    by_label(cmp.slider, "Probe Pruning ratio").set_value(0.4)
    by_label(cmp.button, "Generate").click().run()
    assert not cmp.exception, cmp.exception
    run_until(cmp, lambda at: len(at.dataframe) == 1 and at.dataframe[0].value.shape[1] == 5)
    table = cmp.dataframe[0].value
    assert list(table.columns) == ["dense", "pruned", "probe", "pruned / dense", "probe / dense"]
    assert 0.6 < table.loc["parameters", "probe / dense"] < 0.95  # 40% of the heads and channels of layers 3+
    assert table.loc["perplexity", "probe"] > table.loc["perplexity", "dense"]
    assert queue.computed - before == 3  # the two known cards were not measured again


def run_until(at: AppTest, done, timeout: float = TIMEOUT) -> AppTest:
    """Rerun the page (as its polling fragment would) until `done(at)`."""
    deadline = time.time() + timeout
    while not done(at):
        assert time.time() < deadline, texts(at)
        time.sleep(0.3)
        at.run()
        assert not at.exception, at.exception
    return at


def infos(at: AppTest) -> str:
    return "\n".join(i.value for i in at.info)


def test_whatif_page_works_in_the_background_and_sweeps():
    import app_pages.common as common
    from pruner.whatif import WhatIfQueue

    manager = common.studio()
    opened = threading.Event()

    @contextlib.contextmanager
    def slot(on_wait):  # the studio's heavy slot, first held shut until the test has changed the metric
        assert opened.wait(TIMEOUT)
        with manager.whatif_slot(on_wait):
            yield

    manager.whatif = WhatIfQueue(slot, eval_count=2)  # the page's queue, on 2 validation windows: quick
    at = page("app_pages/whatif.py")
    # the script run ends before any pruning: the page shows what is queued instead of a result
    assert not at.metric and "next: flap at ratio 0.30 (auto)" in infos(at)
    by_label(at.selectbox, "Metric").set_value("magnitude").run()
    assert not at.metric and "next: magnitude at ratio 0.30 (auto) and 1 more" in infos(at)
    opened.set()
    run_until(at, lambda at: len(at.metric) == 4 and "..." not in at.metric[1].value)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Achieved ratio"]) == pytest.approx(0.3, abs=0.02)
    assert float(metrics["Perplexity"]) > float(metrics["Dense perplexity"])
    assert manager.whatif.computed == 2  # magnitude and the dense model: the superseded flap never ran
    # the chart names the setting it shows (the soak bench waits for this title)
    assert "(magnitude, ratio 0.30, auto)" in charts(at)[0]
    by_label(at.multiselect, "Methods").set_value(["magnitude"])
    by_label(at.multiselect, "Ratios").set_value([0.2, 0.4])
    by_label(at.button, "Run sweep").click().run()
    assert not at.exception, at.exception
    assert len(charts(at)) == 1 and "magnitude at ratio 0.20 (auto)" in infos(at)
    run_until(at, lambda at: len(charts(at)) == 2)
    sweep = charts(at)[1]
    assert ">magnitude</text>" in sweep and ">dense</text>" in sweep  # a legend entry and the dense line's label
    assert not at.info and manager.whatif.computed == 4  # nothing left to work on: no polling


def test_runs_page_empty_then_delete():
    at = page("app_pages/runs.py")
    assert any("No runs yet" in i.value for i in at.info)
    prune = page("app_pages/prune.py")
    start_run(prune, "magnitude")
    wait_for_status(prune, ("finished",))
    at = page("app_pages/runs.py")
    assert len(at.dataframe[0].value) == 1
    by_label(at.button, "Delete").click().run()
    assert any("No runs yet" in i.value for i in at.info)


def test_prune_page_sparse_run_shows_layers_errors_and_perplexity():
    """An N:M run from the Prune page: the ratio follows the pattern, the run counts layers, and the
    finished run shows its per-layer errors, its perplexity and that it is stored dense."""
    at = page("app_pages/prune.py")
    by_label(at.selectbox, "Method").set_value("wanda").run()
    assert "Granularity" not in [s.label for s in at.selectbox]
    by_label(at.selectbox, "Sparsity type").set_value("2:4").run()
    assert "Pruning ratio" not in [s.label for s in at.slider]
    assert {m.label: m.value for m in at.metric}["Sparsity"] == "0.5"
    start_run(at, "wanda", **{"Calibration windows": 2})
    assert wait_for_status(at, ("finished", "failed")) == "finished"
    run_until(at, lambda at: "Validation perplexity" in [m.label for m in at.metric])  # from the What-if queue
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers done"] == "30" and float(metrics["Achieved ratio"]) == pytest.approx(0.5, abs=1e-3)
    assert float(metrics["Validation perplexity"]) > float(metrics["Dense perplexity"])
    assert float(metrics["Mean error after"]) == pytest.approx(float(metrics["Mean error before"]))  # no update
    assert any("dense safetensors with zeros" in i.value for i in at.info)
    assert charts(at)


def test_prune_page_reconstruction_lowers_the_layer_errors():
    import app_pages.common as common
    from pruner.config import REFIT_DAMP
    from pruner.run_record import read_record

    at = page("app_pages/prune.py")
    assert "Refit damping" not in [n.label for n in at.number_input]  # only with a reconstruction
    by_label(at.selectbox, "Method").set_value("magnitude").run()
    by_label(at.selectbox, "Reconstruct").set_value("ls").run()
    assert by_label(at.number_input, "Refit damping").value == REFIT_DAMP
    start_run(at, "magnitude", **{"Calibration windows": 2, "Refit damping": 0.5})
    assert wait_for_status(at, ("finished", "failed")) == "finished"
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Mean error after"]) < float(metrics["Mean error before"])
    assert metrics["Layers done"] == "30"
    run_id = at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]
    assert read_record(common.studio().folder(run_id))["settings"]["refit_damp"] == 0.5


def test_whatif_page_reconstructs():
    """The Reconstruct switch: the queue computes the refitted pruning, whose validation perplexity is
    below the plain one, and the page adds the per-layer reconstruction errors."""
    import app_pages.common as common
    from pruner.whatif import WhatIfQueue

    manager = common.studio()
    manager.whatif = WhatIfQueue(manager.whatif_slot, eval_count=2)
    at = page("app_pages/whatif.py")
    by_label(at.selectbox, "Metric").set_value("magnitude").run()
    run_until(at, lambda at: len(at.metric) == 4 and "..." not in at.metric[1].value)
    plain = float({m.label: m.value for m in at.metric}["Perplexity"])
    by_label(at.selectbox, "Reconstruct").set_value("ls").run()
    run_until(at, lambda at: len(charts(at)) == 2)  # kept fractions and the reconstruction errors
    refitted = float({m.label: m.value for m in at.metric}["Perplexity"])
    assert refitted < plain



def test_prune_page_offers_wanda_sp_statistics_for_wanda_sp_only():
    at = page("app_pages/prune.py")
    by_label(at.selectbox, "Method").set_value("wanda-sp").run()
    assert by_label(at.selectbox, "Wanda-sp statistics").options == ["dense", "sequential"]
    by_label(at.selectbox, "Method").set_value("flap").run()
    assert "Wanda-sp statistics" not in [s.label for s in at.selectbox]
