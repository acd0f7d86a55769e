"""What-if: prune by a metric in seconds at any ratio; sweep perplexity vs ratio, PG runs overlaid."""

import plotly.graph_objects as go
import streamlit as st

from app_pages.common import cached_model, choices, current_model, layers_figure, show_error, studio
from pruner.errors import PrunerError
from pruner.evaluate import perplexity
from pruner.config import PruneConfig
from pruner.prune import prune
from pruner.space import GRANULARITIES
from pruner.windows import corpus_windows

st.title("What-if")
st.caption("What happens if I prune this model by 30%? By 50%? A metric method answers in seconds "
           "(calibration statistics are computed once per model and reused). Perplexity on 16 validation "
           "windows of 128 tokens, the same windows the policy-gradient runs evaluate on by default.")
c = choices()
loaded = current_model()
EVAL_SEQLEN, EVAL_WINDOWS, CALIB_WINDOWS = 128, 16, 32
METRIC_METHODS = ["flap", "wanda-sp", "taylor", "magnitude"]


@st.cache_data(show_spinner=False, max_entries=256)
def prune_and_measure(spec: str, device: str, dtype: str, data: str, method: str, ratio: float, granularity: str) -> dict:
    """Perplexity and per-layer report of one metric pruning (cached per setting)."""
    model = current_model()
    config = PruneConfig(method=method, ratio=ratio, granularity=granularity, data=data, calib_windows=CALIB_WINDOWS)
    pruned, _, report = prune(model, config)
    windows = corpus_windows(model.tokenizer, data, "validation", EVAL_SEQLEN, EVAL_WINDOWS)
    return {"ppl": perplexity(pruned, windows)["ppl"], "achieved_ratio": report["achieved_ratio"],
            "per_layer": report["per_layer"], "wall_time_s": report["wall_time_s"]}


@st.cache_data(show_spinner=False)
def dense_ppl(spec: str, device: str, dtype: str, data: str) -> float:
    model = current_model()
    windows = corpus_windows(model.tokenizer, data, "validation", EVAL_SEQLEN, EVAL_WINDOWS)
    return perplexity(model.model, windows)["ppl"]


@st.cache_data(show_spinner="Measuring a saved run...", max_entries=64)
def saved_model_ppl(path: str, device: str, dtype: str, data: str) -> float:
    """Perplexity of a run's saved model on the same validation windows."""
    pruned = cached_model(path, device, dtype)
    windows = corpus_windows(pruned.tokenizer, data, "validation", EVAL_SEQLEN, EVAL_WINDOWS)
    return perplexity(pruned.model, windows)["ppl"]


key = (c["model_spec"], c["device"], c["dtype"], c["data"])
cols = st.columns([1, 3, 1])
method = cols[0].selectbox("Metric", METRIC_METHODS)
ratio = cols[1].slider("Ratio", 0.05, 0.8, 0.3, 0.05, help="Fraction of decoder-linear parameters removed")
granularity = cols[2].selectbox("Granularity", GRANULARITIES)
try:
    with st.spinner(f"Pruning with {method} at {ratio:.2f} (the first time also calibrates)..."):
        result = prune_and_measure(*key, method, ratio, granularity)
        base = dense_ppl(*key)
except PrunerError as exc:
    show_error(exc)
    st.stop()
cols = st.columns(4)
cols[0].metric("Perplexity", f"{result['ppl']:.1f}", delta=f"{result['ppl'] / base:.2f}x dense", delta_color="off")
cols[1].metric("Dense perplexity", f"{base:.1f}")
cols[2].metric("Achieved ratio", f"{result['achieved_ratio']:.3f}")
cols[3].metric("Pruning time", f"{result['wall_time_s']:.1f} s")
with st.container(key="whatif_layers"):
    st.plotly_chart(layers_figure(result["per_layer"], f"Per-layer kept fraction ({method}, ratio {ratio:.2f})"),
                    width="stretch")

st.subheader("Sweep: perplexity vs ratio")
cols = st.columns([3, 2, 1])
methods = cols[0].multiselect("Methods", METRIC_METHODS, ["flap", "wanda-sp"])
ratios = cols[1].multiselect("Ratios", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5])
if cols[2].button("Run sweep", type="primary") or st.session_state.get("sweep_done") == (key, methods, ratios):
    fig = go.Figure()
    bar = st.progress(0.0, text="sweeping...")
    total, done = len(methods) * len(ratios), 0
    for m in methods:
        points = []
        for r in sorted(ratios):
            points.append((r, prune_and_measure(*key, m, r, "auto")["ppl"]))
            done += 1
            bar.progress(done / total, text=f"{m} at {r}")
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=m)
    bar.empty()
    pg_points = [(info["settings"]["ratio"], saved_model_ppl(info["dir"] + "/model", *key[1:]), info["id"])
                 for info in studio().runs()
                 if info.get("has_model") and info.get("settings", {}).get("method") == "pg"
                 and info["settings"].get("model") == c["model_spec"] and info["settings"].get("data") == c["data"]]
    if pg_points:
        fig.add_scatter(x=[p[0] for p in pg_points], y=[p[1] for p in pg_points], mode="markers", name="pg runs",
                        text=[p[2] for p in pg_points], marker=dict(size=12, symbol="star"))
    # a trace, not add_hline(annotation_text=...): on a log axis that annotation is placed at 10**y
    fig.add_scatter(x=[min(ratios), max(ratios)], y=[base, base], mode="lines", name="dense",
                    line=dict(dash="dot", color="grey"))
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_layout(height=380, xaxis_title="ratio", yaxis_title="validation perplexity",
                      margin=dict(l=10, r=10, t=30, b=10))
    st.session_state["sweep_done"] = (key, methods, ratios)
    with st.container(key="sweep_chart"):
        st.plotly_chart(fig, width="stretch")
