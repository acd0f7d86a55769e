"""What every page shares: the process-wide model cache and run manager, the session's choices,
errors shown in the page, and the chart builders (plotly figures from pruner.views data)."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import streamlit as st

from pruner import views
from pruner.errors import PrunerError
from pruner.models import load_model
from pruner.studio import Studio

DEFAULTS = {"model_spec": "embedded", "data": "brown", "device": "auto", "dtype": "auto", "granularity": "auto"}
POLL_SECONDS = 1.0
CHART_HEIGHT = 300


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

def _layout(fig: go.Figure, title: str, xaxis: str, yaxis: str) -> go.Figure:
    fig.update_layout(title=title, height=CHART_HEIGHT, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis_title=xaxis, yaxis_title=yaxis, legend=dict(orientation="h", y=-0.25))
    return fig


def loss_figure(steps: list[dict]) -> go.Figure:
    """The K sample losses of each step (dots), their mean, and the moving baseline."""
    fig = go.Figure()
    xs = [r["step"] for r in steps for _ in r["losses"]]
    ys = [x for r in steps for x in r["losses"]]
    fig.add_scatter(x=xs, y=ys, mode="markers", name="sample losses", marker=dict(size=4, opacity=0.45))
    fig.add_scatter(x=[r["step"] for r in steps], y=[r["loss_mean"] for r in steps], mode="lines", name="mean")
    fig.add_scatter(x=[r["step"] for r in steps], y=[r["baseline"] for r in steps], mode="lines",
                    name="baseline (moving average)", line=dict(dash="dot"))
    return _layout(fig, "Loss of sampled masks", "step", "cross-entropy")


def variance_figure(steps: list[dict]) -> go.Figure:
    """The spread of the step's gradient estimates: their variance across the K samples (independent
    masks), and their mean square (any sampling; one antithetic pair has no variance to measure)."""
    fig = go.Figure()
    x = [r["step"] for r in steps]
    if any(r.get("grad_variance") is not None for r in steps):
        fig.add_scatter(x=x, y=[r.get("grad_variance") for r in steps], mode="lines", name="variance across samples")
    if any("grad_mean_square" in r for r in steps):
        fig.add_scatter(x=x, y=[r.get("grad_mean_square") for r in steps], mode="lines", name="mean square")
    fig.update_yaxes(type="log", dtick=1, exponentformat="power")  # one label per decade
    return _layout(fig, "Spread of the gradient estimate", "step", "mean per unit")


def budget_figure(steps: list[dict]) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=[r["step"] for r in steps], y=[r["expected_kept_fraction"] for r in steps], mode="lines",
                    name="expected kept fraction")
    if steps:
        fig.add_hline(y=steps[-1]["target_kept_fraction"], line_dash="dash", annotation_text="budget")
    return _layout(fig, "Expected kept parameters", "step", "fraction of decoder-linear params")


def ppl_figure(evals: list[dict]) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=[e["step"] for e in evals], y=[e["ppl"] for e in evals], mode="lines+markers",
                    name="hard-mask validation perplexity")
    return _layout(fig, "Validation perplexity of the current hard mask", "step", "perplexity")


def heatmap_figure(matrix, title: str, xlabel: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix.tolist(), zmin=0, zmax=1, colorscale="Viridis",
                               colorbar=dict(title="keep p")))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(CHART_HEIGHT, 14 * matrix.shape[0] + 80))
    return _layout(fig, title, xlabel, "layer")


def layers_figure(per_layer: list[dict], title: str) -> go.Figure:
    fig = go.Figure()
    fig.add_bar(x=[r["layer"] for r in per_layer], y=[r["kept_fraction"] for r in per_layer], name="kept")
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, title, "layer", "kept fraction of layer parameters")


def mask_change_figure(heads, channels) -> go.Figure:
    """Share of units whose decision changed from one batch to the next (mean over pruned layers)."""
    fig = go.Figure()
    xs = list(range(1, heads.shape[0] + 1))
    fig.add_scatter(x=xs, y=heads.mean(1).tolist(), mode="lines+markers", name="query heads")
    fig.add_scatter(x=xs, y=channels.mean(1).tolist(), mode="lines+markers", name="MLP channels")
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, "Mask change from the previous batch", "batch", "share of units flipped")


def batch_times_figure(batches: list[dict]) -> go.Figure:
    """Wall time of the dense and the probe-pruned forward of every batch."""
    fig = go.Figure()
    xs = [b["batch"] for b in batches]
    fig.add_bar(x=xs, y=[b["dense_s"] for b in batches], name="dense")
    fig.add_bar(x=xs, y=[b["probe_s"] for b in batches], name="probe pruning (probe included)")
    return _layout(fig, "Forward wall time per batch", "batch", "seconds")


def layer_errors_figure(records: list[dict], title: str) -> go.Figure:
    """Per layer, the relative output error of its updated linears before and after the update."""
    data = views.layer_errors(records)
    fig = go.Figure()
    fig.add_scatter(x=data["layer"], y=data["before"], mode="lines+markers", name="before the update (mask only)")
    fig.add_scatter(x=data["layer"], y=data["after"], mode="lines+markers", name="after the update")
    fig.update_yaxes(type="log", exponentformat="power")
    return _layout(fig, title, "layer", "||XW'-XW||² / ||XW||² (mean over linears)")
