"""What-if: prune by a metric in seconds at any ratio, with or without a reconstruction; sweep
perplexity vs ratio with the saved runs (searches, unstructured / N:M, reconstructions) overlaid."""

import plotly.graph_objects as go
import streamlit as st

from app_pages.common import (EVAL_SEQLEN, EVAL_WINDOWS, choices, current_model, dense_ppl, layer_errors_figure,
                              layers_figure, saved_model_ppl, show_error, studio, validation_windows)
from pruner import views
from pruner.config import RECONSTRUCT, PruneConfig
from pruner.errors import PrunerError
from pruner.evaluate import perplexity
from pruner.prune import prune

st.title("What-if")
st.caption("What happens if I prune this model by 30%? By 50%? A metric method answers in seconds "
           "(calibration statistics are computed once per model and reused); a reconstruction refits the kept "
           f"weights layer by layer and takes longer. Perplexity on {EVAL_WINDOWS} validation windows of "
           f"{EVAL_SEQLEN} tokens, the same windows the policy-gradient runs evaluate on by default.")
c = choices()
loaded = current_model()
CALIB_WINDOWS = 32
METRIC_METHODS = ["flap", "wanda-sp", "magnitude"]


@st.cache_data(show_spinner=False, max_entries=256)
def prune_and_measure(spec: str, device: str, dtype: str, data: str, method: str, ratio: float, granularity: str,
                      reconstruct: str = "none") -> dict:
    """Perplexity and per-layer report of one metric pruning (cached per setting)."""
    model = current_model()
    config = PruneConfig(method=method, ratio=ratio, granularity=granularity, data=data, calib_windows=CALIB_WINDOWS,
                         reconstruct=reconstruct)
    pruned, _, report = prune(model, config)
    return {"ppl": perplexity(pruned, validation_windows(model, data))["ppl"], "achieved_ratio": report["achieved_ratio"],
            "per_layer": report["per_layer"], "wall_time_s": report["wall_time_s"],
            "layer_errors": report.get("weight_update", {}).get("per_layer", [])}


key = (c["model_spec"], c["device"], c["dtype"], c["data"])
cols = st.columns([1, 3, 1, 1])
method = cols[0].selectbox("Metric", METRIC_METHODS)
ratio = cols[1].slider("Ratio", 0.05, 0.8, 0.3, 0.05, help="Fraction of decoder-linear parameters removed")
granularity = cols[2].selectbox("Granularity", ["kv_group", "query_head", "block"])
reconstruct = cols[3].selectbox("Reconstruct", RECONSTRUCT,
                                help="Refit the kept columns of o_proj and down_proj and their bias layer by layer "
                                     "after the mask is chosen: ls (least squares) or admm (ADMM fixed-mask update)")
try:
    with st.spinner(f"Pruning with {method} at {ratio:.2f}"
                    + (f", reconstructing by {reconstruct}" if reconstruct != "none" else "")
                    + " (the first time also calibrates)..."):
        result = prune_and_measure(*key, method, ratio, granularity, reconstruct)
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
if result["layer_errors"]:
    with st.container(key="whatif_errors"):
        st.plotly_chart(layer_errors_figure(result["layer_errors"], f"Per-layer relative output error, {reconstruct} "
                                            "reconstruction"), width="stretch")

st.subheader("Sweep: perplexity vs ratio")
cols = st.columns([3, 2, 1])
methods = cols[0].multiselect("Methods", METRIC_METHODS, ["flap", "wanda-sp"])
ratios = cols[1].multiselect("Ratios", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5])
if cols[2].button("Run sweep", type="primary") or st.session_state.get("sweep_done") == (key, methods, ratios,
                                                                                        reconstruct):
    fig = go.Figure()
    bar = st.progress(0.0, text="sweeping...")
    total, done = len(methods) * len(ratios), 0
    suffix = f" + {reconstruct}" if reconstruct != "none" else ""
    for m in methods:
        points = []
        for r in sorted(ratios):
            points.append((r, prune_and_measure(*key, m, r, "kv_group", reconstruct)["ppl"]))
            done += 1
            bar.progress(done / total, text=f"{m}{suffix} at {r}")
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=m + suffix)
    bar.empty()
    saved = {}  # kind of run -> (ratio, perplexity, label) of every saved run of this model and corpus
    for info in studio().runs():
        s = info.get("settings", {})
        kind = views.run_kind(s)
        if info.get("has_model") and kind != "metric" and s.get("model") == c["model_spec"] and s.get("data") == c["data"]:
            saved.setdefault(kind, []).append((s["ratio"], saved_model_ppl(info["dir"] + "/model", *key[1:]),
                                               f"{views.run_label(s)} · {info['id']}"))
    symbols = {"pg": "star", "unstructured / N:M": "diamond", "reconstructed": "x"}
    for kind, points in saved.items():
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name=f"{kind} runs",
                        text=[p[2] for p in points], marker=dict(size=12, symbol=symbols.get(kind, "circle")))
    # a trace, not add_hline(annotation_text=...): on a log axis that annotation is placed at 10**y
    fig.add_scatter(x=[min(ratios), max(ratios)], y=[base, base], mode="lines", name="dense",
                    line=dict(dash="dot", color="grey"))
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_layout(height=380, xaxis_title="ratio", yaxis_title="validation perplexity",
                      margin=dict(l=10, r=10, t=30, b=10))
    st.session_state["sweep_done"] = (key, methods, ratios, reconstruct)
    with st.container(key="sweep_chart"):
        st.plotly_chart(fig, width="stretch")
        st.caption("Saved runs of the Prune page are overlaid. For unstructured / N:M runs the ratio is the fraction "
                   "of weights set to zero (the model keeps its size); for the others, of parameters removed.")
