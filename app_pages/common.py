"""What every page shares: the process-wide model cache and run manager, the session's choices,
errors shown in the page, and the charts (inline SVG from pruner.views data, app_pages.charts)."""

from __future__ import annotations

import json

import streamlit as st

from app_pages import charts
from app_pages.charts import Series
from pruner import views
from pruner.errors import PrunerError
from pruner.models import load_model
from pruner.studio import Studio

DEFAULTS = {"model_spec": "embedded", "data": "brown", "device": "auto", "dtype": "auto", "granularity": "auto"}
POLL_SECONDS = 1.0


@st.cache_resource(show_spinner="Loading the model (once per process)...", max_entries=6)
def cached_model(spec: str, device: str, dtype: str):
    """Shared by every session; never modified in place (runs prune private copies)."""
    return load_model(spec, device=device, dtype=dtype)


@st.cache_resource
def studio() -> Studio:
    """The process's run manager: survives reruns, page switches and browser refreshes."""
    return Studio()


def choices() -> dict:
    """The session's model/corpus/device/dtype (defaults: the embedded model and Brown)."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    return {key: st.session_state[key] for key in DEFAULTS}


def current_model():
    """The chosen model, loaded once per process; a bad choice stops the page with its error."""
    c = choices()
    try:
        return cached_model(c["model_spec"], c["device"], c["dtype"])
    except PrunerError as exc:
        st.error(f"Could not load model `{c['model_spec']}`: {exc}")
        st.info("Pick another model on the **Model & data** page.")
        st.stop()


def load_for_run(spec: str):
    """Loader handed to the run manager when it resumes a run from disk."""
    c = choices()
    return cached_model(spec, c["device"], c["dtype"])


def known(queue, requests) -> bool:
    """Whether the What-if `queue` has a result for every one of `requests`."""
    return all(queue.result(w) is not None for w in requests)


def polled(queue, wanted: list, loaded, show, needed: list) -> None:
    """Submit the page's wish list `wanted` (most wanted first) on `loaded` to the What-if `queue`
    (which also keeps their known results from eviction) and draw `show`; while the queue lacks
    results of `needed`, redraw it every POLL_SECONDS in a fragment that re-submits `wanted` (so a
    page another session superseded gets its turn again), and rerun the whole page once they are
    all in, which ends the polling."""
    queue.submit(wanted, loaded)
    if known(queue, needed):
        show()
        return

    @st.fragment(run_every=POLL_SECONDS)
    def live():
        queue.submit(wanted, loaded)
        show()
        if known(queue, needed):
            st.rerun()
    live()


def show_error(exc: Exception) -> None:
    st.error(str(exc) if isinstance(exc, PrunerError) else f"{type(exc).__name__}: {exc}")


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2)


# ---- figures ------------------------------------------------------------------------------

def draw(svg: str) -> None:
    """Put one chart (an SVG string from app_pages.charts) in the page."""
    st.markdown(svg, unsafe_allow_html=True)


def loss_figure(steps: list[dict]) -> str:
    """The K sample losses of each step (dots), their mean, and the moving baseline."""
    x = [r["step"] for r in steps]
    return charts.line_chart([
        Series("sample losses", [r["step"] for r in steps for _ in r["losses"]],
               [v for r in steps for v in r["losses"]], mode="markers", size=2.5, opacity=0.45),
        Series("mean", x, [r["loss_mean"] for r in steps]),
        Series("baseline (moving average)", x, [r["baseline"] for r in steps], dash=True),
    ], "Loss of sampled masks", "step", "cross-entropy", key="loss")


def variance_figure(steps: list[dict]) -> str:
    """The spread of the step's gradient estimates: their variance across the K samples (independent
    masks), and their mean square (any sampling; one antithetic pair has no variance to measure)."""
    x = [r["step"] for r in steps]
    series = []
    if any(r.get("grad_variance") is not None for r in steps):
        series.append(Series("variance across samples", x, [r.get("grad_variance") for r in steps]))
    if any("grad_mean_square" in r for r in steps):
        series.append(Series("mean square", x, [r.get("grad_mean_square") for r in steps]))
    return charts.line_chart(series, "Spread of the gradient estimate", "step", "mean per unit", log_y=True,
                             key="variance")


def budget_figure(steps: list[dict]) -> str:
    return charts.line_chart(
        [Series("expected kept fraction", [r["step"] for r in steps], [r["expected_kept_fraction"] for r in steps])],
        "Expected kept parameters", "step", "fraction of decoder-linear params",
        hlines=[(steps[-1]["target_kept_fraction"], "budget")] if steps else (), key="budget")


def ppl_figure(evals: list[dict]) -> str:
    """Validation perplexity of the hard mask at each evaluation, with (result=best) its perplexity on
    the held-out calibration blocks and a star on the best so far: the mask the search returns."""
    steps = [e["step"] for e in evals]
    series = [Series("validation", steps, [e["ppl"] for e in evals], mode="lines+markers")]
    held = [e for e in evals if "holdout_ppl" in e]
    if held:
        series.append(Series("held-out calibration blocks", [e["step"] for e in held],
                             [e["holdout_ppl"] for e in held], mode="lines+markers", dash=True))
        best = held[-1]["best_step"]
        chosen = [e for e in evals if e["step"] == best]
        if chosen:  # the start (step 0) is a candidate too, but has no validation point to mark
            series.append(Series("best on held-out (the result)", [best], [chosen[0]["ppl"]], mode="markers",
                                 symbol="star", size=7.0))
    return charts.line_chart(series, "Perplexity of the current hard mask", "step", "perplexity", key="ppl")


def heatmap_figure(matrix, title: str, xlabel: str, cell: str | None = None) -> str:
    return charts.heatmap(matrix, title, xlabel, "layer", cell=cell)


def layers_figure(per_layer: list[dict], title: str) -> str:
    return charts.bar_chart([r["layer"] for r in per_layer], {"kept": [r["kept_fraction"] for r in per_layer]},
                            title, "layer", "kept fraction of layer parameters", y_range=(0.0, 1.0),
                            width=charts.WIDE, key="layers")


def mask_change_figure(heads, channels) -> str:
    """Share of units whose decision changed from one batch to the next (mean over pruned layers)."""
    xs = list(range(1, heads.shape[0] + 1))
    return charts.line_chart([Series("query heads", xs, heads.mean(1).tolist(), mode="lines+markers"),
                              Series("MLP channels", xs, channels.mean(1).tolist(), mode="lines+markers")],
                             "Mask change from the previous batch", "batch", "share of units flipped",
                             y_range=(0.0, 1.0), key="mask-change")


def batch_times_figure(batches: list[dict]) -> str:
    """Wall time of the dense and the probe-pruned forward of every batch."""
    return charts.bar_chart([b["batch"] for b in batches],
                            {"dense": [b["dense_s"] for b in batches],
                             "probe pruning (probe included)": [b["probe_s"] for b in batches]},
                            "Forward wall time per batch", "batch", "seconds", key="batch-times")


def layer_errors_figure(records: list[dict], title: str) -> str:
    """Per layer, the relative output error of its updated linears before and after the update."""
    data = views.layer_errors(records)
    return charts.line_chart([Series("before the update (mask only)", data["layer"], data["before"],
                                     mode="lines+markers"),
                              Series("after the update", data["layer"], data["after"], mode="lines+markers")],
                             title, "layer", "||XW'-XW||² / ||XW||² (mean over linears)", log_y=True,
                             width=charts.WIDE, key="layer-errors")
