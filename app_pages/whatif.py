"""What-if: prune by a metric in seconds at any ratio; sweep perplexity vs ratio, PG runs overlaid.

The page never prunes: it hands what it wants to show to the studio's What-if queue (one computation
at a time, a newer change replaces queued ones, none while a run is going) and polls for the results.
"""

import streamlit as st

from app_pages import charts
from app_pages.charts import Series
from app_pages.common import choices, current_model, draw, layer_errors_figure, layers_figure, polled, studio
from pruner import views
from pruner.config import RECONSTRUCT
from pruner.space import GRANULARITIES
from pruner.whatif import CALIB_WINDOWS, EVAL_SEQLEN, EVAL_WINDOWS, WhatIf, describe_state

st.title("What-if")
st.caption("What happens if I prune this model by 30%? By 50%? A metric method answers in seconds "
           f"(calibration statistics on {CALIB_WINDOWS} windows are computed once per model and reused). "
           f"Perplexity on {EVAL_WINDOWS} validation windows of {EVAL_SEQLEN} tokens, the same windows the "
           "policy-gradient runs evaluate on by default. One computation at a time, in the background; "
           "a newer change replaces the ones still queued.")
c = choices()
loaded = current_model()
manager = studio()
queue = manager.whatif
METRIC_METHODS = ["flap", "wanda-sp", "taylor", "magnitude"]
SWEEP_GRANULARITY = "auto"
model_key = (c["model_spec"], c["device"], c["dtype"])

cols = st.columns([1, 3, 1, 1])
method = cols[0].selectbox("Metric", METRIC_METHODS)
ratio = cols[1].slider("Ratio", 0.05, 0.8, 0.3, 0.05, help="Fraction of decoder-linear parameters removed")
granularity = cols[2].selectbox("Granularity", GRANULARITIES)
reconstruct = cols[3].selectbox("Reconstruct", RECONSTRUCT,
                                help="Refit the kept columns of o_proj and down_proj and their bias layer by layer "
                                     "after the mask is chosen: ls (least squares) or admm (ADMM fixed-mask update); "
                                     "slower than the metric alone")
current = WhatIf.pruning(*model_key, c["data"], method, ratio, granularity, reconstruct)
dense = WhatIf.dense(*model_key, c["data"])
result_box = st.container()

st.subheader("Sweep: perplexity vs ratio")
cols = st.columns([3, 2, 1])
methods = cols[0].multiselect("Methods", METRIC_METHODS, ["flap", "wanda-sp"])
ratios = sorted(cols[1].multiselect("Ratios", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5]))
sweep_key = (model_key, c["data"], tuple(methods), tuple(ratios), reconstruct)
if cols[2].button("Run sweep", type="primary", disabled=not (methods and ratios)):
    st.session_state["sweep"] = sweep_key
sweeping = st.session_state.get("sweep") == sweep_key
sweep_box = st.container()
sweep = {m: [WhatIf.pruning(*model_key, c["data"], m, r, SWEEP_GRANULARITY, reconstruct) for r in ratios]
         for m in methods} \
    if sweeping else {}
saved_runs = [info for info in (manager.runs() if sweeping else [])  # searches, unstructured / N:M, reconstructed
              if info.get("has_model") and views.run_kind(info.get("settings", {})) != "metric"
              and info["settings"].get("model") == c["model_spec"] and info["settings"].get("data") == c["data"]]
pg_points = [(info["settings"]["ratio"], f"{views.run_label(info['settings'])} · {info['id']}",
              WhatIf.saved(info["dir"] + "/model", c["device"], c["dtype"], c["data"]), views.run_kind(info["settings"]))
             for info in saved_runs]
wanted = [current, dense] + [w for points in sweep.values() for w in points] + [w for _, _, w, _ in pg_points]


def working() -> None:
    """What the queue does now, in words: the page's visible "working" state."""
    with st.container(key="whatif_working"):
        st.info(describe_state(queue.state()), icon=":material/hourglass_top:")


def show_result() -> None:
    """Metrics and per-layer chart of the current setting, or what the queue is doing meanwhile."""
    result, base = queue.result(current), queue.result(dense)
    if result is None:
        st.caption(f"Working on {current.describe()}...")
        working()
        return
    if "error" in result:
        st.error(result["error"])
        return
    ppl_base = base.get("ppl") if base else None
    cols = st.columns(4)
    cols[0].metric("Perplexity", f"{result['ppl']:.1f}",
                   delta=f"{result['ppl'] / ppl_base:.2f}x dense" if ppl_base else None, delta_color="off")
    cols[1].metric("Dense perplexity", f"{ppl_base:.1f}" if ppl_base else ("error" if base else "..."))
    cols[2].metric("Achieved ratio", f"{result['achieved_ratio']:.3f}")
    cols[3].metric("Pruning time", f"{result['wall_time_s']:.1f} s")
    if base and "error" in base:
        st.error(base["error"])
    with st.container(key="whatif_layers"):
        draw(layers_figure(result["per_layer"],
                           f"Per-layer kept fraction ({method}, ratio {ratio:.2f}, {granularity})"))
    if result.get("layer_errors"):
        with st.container(key="whatif_errors"):
            draw(layer_errors_figure(result["layer_errors"], f"Per-layer relative output error, "
                                     f"{reconstruct} reconstruction"))


SWEEP_NEEDED = [w for points in sweep.values() for w in points] + [w for _, _, w, _ in pg_points] + [dense]


def show_sweep() -> None:
    """The sweep chart once every point is known, else its progress and what the queue is doing."""
    if not sweeping:
        return
    results = {w: queue.result(w) for w in SWEEP_NEEDED}
    missing = sum(r is None for r in results.values())
    if missing:
        st.progress(1 - missing / len(SWEEP_NEEDED), text=f"sweep: {len(SWEEP_NEEDED) - missing} / "
                                                           f"{len(SWEEP_NEEDED)} points")
        working()
        return
    for error in sorted({r["error"] for r in results.values() if "error" in r}):
        st.error(error)
    suffix = f" + {reconstruct}" if reconstruct != "none" else ""
    series = []
    for m, points in sweep.items():
        ok = [(w.ratio, results[w]["ppl"]) for w in points if "ppl" in results[w]]
        series.append(Series(m + suffix, [p[0] for p in ok], [p[1] for p in ok], mode="lines+markers"))
    symbols = {"pg": "star", "unstructured / N:M": "diamond", "reconstructed": "cross"}
    for kind in dict.fromkeys(k for _, _, _, k in pg_points):
        stars = [(r, results[w]["ppl"], label) for r, label, w, k in pg_points if k == kind and "ppl" in results[w]]
        if stars:
            series.append(Series("pg runs" if kind == "pg" else f"{kind} runs", [p[0] for p in stars],
                                 [p[1] for p in stars], mode="markers", symbol=symbols.get(kind, "circle"), size=7,
                                 labels=[p[2] for p in stars]))
    dense_ppl = results[dense].get("ppl")
    svg = charts.line_chart(series, "Validation perplexity against ratio", "ratio", "validation perplexity",
                            log_y=True, hlines=[(dense_ppl, "dense")] if dense_ppl else (), width=charts.WIDE,
                            height=380, key="sweep")
    with st.container(key="sweep_chart"):
        draw(svg)


with result_box:
    polled(queue, wanted, loaded, show_result, [current, dense])
with sweep_box:
    polled(queue, wanted, loaded, show_sweep, SWEEP_NEEDED if sweeping else [])
