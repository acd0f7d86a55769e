"""The Probe page in-process (AppTest): a few tiny batches in the background, then what they kept."""

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pruner.paths import embedded_model_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (embedded_model_dir() / "config.json").is_file(),
                                reason="embedded model not prepared (make test prepares it)")


@pytest.fixture(autouse=True)
def fresh_studio(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNER_RUNS_DIR", str(tmp_path / "runs"))
    import app_pages.common as common

    common.studio.clear()
    yield
    manager = common.studio()
    if manager.active():
        manager.active().stop()
        manager.active().wait(120)
    common.studio.clear()


def by_label(elements, label):
    return next(e for e in elements if e.label == label)


def test_probe_page_runs_batches_and_shows_what_they_kept(tmp_path):
    from pruner.corpus import load_text

    short = tmp_path / "short.txt"  # calibrating on all of Brown's train split would dominate the test
    short.write_text(load_text("brown", "validation")[:20000])
    at = AppTest.from_file(str(ROOT / "app_pages/probe.py"), default_timeout=600)
    at.session_state["data"] = str(short)
    at.run()
    assert not at.exception, at.exception
    assert any("Press **Start**" in i.value for i in at.info)
    by_label(at.number_input, "Batches").set_value(2)
    by_label(at.number_input, "Batch size").set_value(1)
    by_label(at.selectbox, "Sequence length").set_value(32)
    by_label(at.number_input, "Calibration windows").set_value(1)
    by_label(at.button, "Start").click().run()
    assert not at.exception, at.exception
    import app_pages.common as common

    with pytest.raises(Exception, match="one heavy run at a time"):  # the slot is taken
        common.studio()._refuse_if_busy()
    deadline = time.time() + 600
    while time.time() < deadline:
        at.run()
        if any("**finished**" in m.value or "**failed**" in m.value for m in at.markdown):
            break
        time.sleep(1)
    assert any("**finished**" in m.value for m in at.markdown), [m.value for m in at.markdown] + [e.value for e in at.error]
    job = common.studio().get_probe(at.session_state["probe_job"])
    assert job.loaded is None and len(job.state()["batches"]) == 2  # the model copy goes, the results stay
    assert common.studio().active() is None and common.studio().get(job.id) is None  # not a run
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Parameters unused"]) > 0.3  # ratio 0.4, layers 0-2 dense, k/v whole
    assert float(metrics["Probe FLOPs"].rstrip("%")) > 0
    assert {"Perplexity", "Time ratio", "Time saved"} <= metrics.keys()
    assert len([m for m in at.markdown if m.value.startswith("<svg")]) == 4  # heads, channels, times, mask changes
    by_label(at.select_slider, "Batch").set_value(0).run()
    assert not at.exception, at.exception
