"""Prune: settings, Start / Pause / Resume / Stop, and the live view of a run (its id is in the URL)."""

import dataclasses

import streamlit as st

from app_pages.common import (POLL_SECONDS, budget_figure, choices, current_model, heatmap_figure, layers_figure,
                          load_for_run, loss_figure, ppl_figure, report_json, show_error, studio, variance_figure)
from pruner import views
from pruner.errors import PrunerError
from pruner.methods import METHODS
from pruner.pg_math import ESTIMATORS, INITS
from pruner.pg_run import BUDGETS, INIT_METRICS, SCOPES, PGConfig
from pruner.prune import PruneConfig, per_layer_report
from pruner.space import GRANULARITIES
from pruner.studio import read_status, saved_history, saved_report

st.title("Prune")
c = choices()
manager = studio()
DEFAULT_PG = PGConfig()

# ---- settings -------------------------------------------------------------------------------
with st.container(border=True):
    cols = st.columns([1, 2, 1, 1, 1])
    method = cols[0].selectbox("Method", ["pg", "flap", "wanda-sp", "magnitude"],
                               help="pg: policy-gradient search (learns per-unit keep probabilities); the others "
                                    "score units once on calibration data")
    ratio = cols[1].slider("Pruning ratio", 0.05, 0.9, 0.3, 0.05,
                           help="Fraction of decoder-linear parameters (q/k/v/o, gate/up/down) to remove")
    granularity = cols[2].selectbox("Granularity", GRANULARITIES, index=GRANULARITIES.index(c["granularity"]))
    seed = cols[3].number_input("Seed", 0, 10**6, 0)
    calib_windows = cols[4].number_input("Calibration windows", 1, 4096, 32,
                                         help="128-token windows of the train split for the metrics (and a metric "
                                              "initialisation); more is steadier, slower")
    pg_fields = {}
    if method == "pg":
        st.markdown("**Policy-gradient settings** (defaults sized for the embedded model on a 2-core CPU)")
        cols = st.columns(6)
        pg_fields["steps"] = cols[0].number_input("Steps", 1, 100_000, DEFAULT_PG.steps)
        pg_fields["samples"] = cols[1].number_input("Samples per step (K)", 2, 64, DEFAULT_PG.samples,
                                                    help="Masks sampled per step; each is scored on the batch")
        pg_fields["batch_size"] = cols[2].number_input("Batch size", 1, 256, DEFAULT_PG.batch_size,
                                                       help="Sequences per mask")
        pg_fields["seqlen"] = cols[3].number_input("Sequence length", 8, 4096, DEFAULT_PG.seqlen)
        pg_fields["lr"] = cols[4].number_input("Learning rate", 1e-5, 10.0, DEFAULT_PG.lr, format="%.4f",
                                               help="Start of the cosine schedule")
        pg_fields["window"] = cols[5].number_input("Baseline window (T)", 1, 1000, DEFAULT_PG.window)
        cols = st.columns(6)
        pg_fields["init"] = cols[0].selectbox("Initialisation", INITS, index=INITS.index(DEFAULT_PG.init),
                                              help="sigmap/const/norm map a metric to probabilities; random ignores it")
        pg_fields["init_metric"] = cols[1].selectbox("Init metric", INIT_METRICS,
                                                     index=INIT_METRICS.index(DEFAULT_PG.init_metric))
        pg_fields["estimator"] = cols[2].selectbox("Estimator", ESTIMATORS,
                                                   help="reference: (L-b)(m-s)/sqrt(s(1-s)); exact: (L-b)(m-s)/(s(1-s))")
        pg_fields["budget"] = cols[3].selectbox("Budget", BUDGETS,
                                                help="separate: heads and channels each keep 1-ratio; joint: one "
                                                     "parameter budget, heads and channels compete")
        pg_fields["scope"] = cols[4].selectbox("Scope", SCOPES, help="global lets layers differ; per_layer doesn't")
        pg_fields["use_baseline"] = cols[5].checkbox("Moving baseline", DEFAULT_PG.use_baseline)
        cols = st.columns(6)
        pg_fields["snapshot_every"] = cols[0].number_input("Snapshot every", 1, 10_000, DEFAULT_PG.snapshot_every,
                                                           help="Steps between heatmap snapshots")
        pg_fields["eval_every"] = cols[1].number_input("Evaluate every", 1, 10_000, DEFAULT_PG.eval_every,
                                                       help="Steps between hard-mask validation perplexities")
        pg_fields["eval_windows"] = cols[2].number_input("Evaluation windows", 1, 1000, DEFAULT_PG.eval_windows)
        pg_fields["checkpoint_every"] = cols[3].number_input("Checkpoint every", 1, 10_000, DEFAULT_PG.checkpoint_every)
        pg_fields["penalty"] = cols[4].number_input("Log-odds penalty", 0.0, 100.0, DEFAULT_PG.penalty)
        pg_fields["prob_floor"] = cols[5].number_input("Probability floor", 0.0, 0.49, DEFAULT_PG.prob_floor,
                                                       format="%.3f")
        pg_fields["bias_compensation"] = st.checkbox(
            "Bias compensation", DEFAULT_PG.bias_compensation,
            help="FLAP's trick inside the search: removed channels take their calibration mean, so each "
                 "sampled mask is scored as the compensated model that is saved")

run_id = st.query_params.get("run")
job = manager.get(run_id) if run_id else None

# ---- controls -------------------------------------------------------------------------------
cols = st.columns(4)
start = cols[0].button("Start", type="primary", width="stretch")
pause = cols[1].button("Pause", width="stretch", disabled=job is None)
resume = cols[2].button("Resume", width="stretch", disabled=run_id is None)
stop = cols[3].button("Stop", width="stretch", disabled=job is None)

if start:
    try:
        pg = dataclasses.replace(DEFAULT_PG, **{k: (float(v) if isinstance(getattr(DEFAULT_PG, k), float) else v)
                                                for k, v in pg_fields.items()})
        config = PruneConfig(method=method, ratio=float(ratio), granularity=granularity, data=c["data"],
                             seed=int(seed), calib_windows=int(calib_windows), pg=pg)
        job = manager.start(current_model(), config)
        st.query_params["run"] = job.id
        st.rerun()  # redraw the controls for the new run
    except PrunerError as exc:
        show_error(exc)
if pause and job is not None:
    job.pause()
if resume and run_id:
    try:
        if job is not None and job.is_alive:
            job.resume()
        else:
            manager.resume(run_id, load_for_run)
            st.rerun()
    except PrunerError as exc:
        show_error(exc)
if stop and job is not None:
    job.stop()

if run_id is None:
    st.info("Press **Start** to prune. With `pg` the run goes on in the background: charts update live, "
            "and you can switch pages or reload; the run's id stays in the URL.")
    st.stop()


# ---- the live view ----------------------------------------------------------------------------
def run_state() -> dict:
    """Status, progress and history of the URL's run, from memory when live, else from disk."""
    job = manager.get(run_id)
    if job is not None:
        info = job.info()
        history = job.history()
        current = None
        if job.pg is not None:
            current = per_layer_report(job.pg.space, job.pg.current_mask())
        return {"info": info, "history": history, "per_layer": current, "report": job.report, "live": job.is_alive}
    run_dir = manager.root / run_id
    if not run_dir.is_dir():
        return {}
    info = read_status(run_dir) | {"id": run_id}
    report = saved_report(run_dir)
    return {"info": info, "history": saved_history(run_dir), "report": report, "live": False,
            "per_layer": report["per_layer"] if report else None}


def render(state: dict) -> None:
    info, history = state["info"], state["history"]
    steps, snapshots, evals = history["steps"], history["snapshots"], history["evals"]
    status = info.get("status", "unknown")
    if status in ("running", "paused") and not state["live"]:
        status = "interrupted"
    with st.container(key="run_status"):
        icon = {"running": ":material/play_circle:", "loading": ":material/hourglass_top:",
                "saving": ":material/save:",
                "paused": ":material/pause_circle:", "stopped": ":material/stop_circle:",
                "finished": ":material/check_circle:", "failed": ":material/error:",
                "interrupted": ":material/warning:"}.get(status, "")
        st.markdown(f"{icon} Run `{run_id}` is **{status}**"
                    + (" (loading data and computing the initialisation)" if status == "loading" else "")
                    + (" (slicing and saving the pruned model)" if status == "saving" else "")
                    + (" — press Resume to continue from its checkpoint" if status in ("stopped", "interrupted") else ""))
        if status == "failed" and info.get("error"):
            st.error("The run failed; its traceback is below and on the Runs page.")
            st.code(info["error"])
    step, total = info.get("step", 0), info.get("steps", 1)
    with st.container(key="run_progress"):
        last = steps[-1] if steps else {}
        eta = views.eta_seconds(steps, step, total)
        st.progress(min(1.0, step / max(total, 1)), text=f"step {step} / {total}")
        cols = st.columns(4)
        cols[0].metric("Mean sample loss", f"{last['loss_mean']:.3f}" if last else "-")
        cols[1].metric("Expected kept fraction", f"{last['expected_kept_fraction']:.3f}" if last else "-",
                       delta=f"budget {last['target_kept_fraction']:.3f}" if last else None, delta_color="off")
        cols[2].metric("Tokens / s", f"{last['tokens_per_s']:.0f}" if last else "-")
        cols[3].metric("ETA", views.format_duration(eta) if state["live"] else "-")
    if steps:
        cols = st.columns(2)
        with cols[0].container(key="loss_chart"):
            st.plotly_chart(loss_figure(steps), width="stretch")
        with cols[1].container(key="variance_chart"):
            st.plotly_chart(variance_figure(steps), width="stretch")
            st.caption("Variance: mean over units of the variance across the K samples of each unit's "
                       "gradient term (L_j - baseline) * score(m_j, s).")
        cols = st.columns(2)
        cols[0].plotly_chart(budget_figure(steps), width="stretch")
        if evals:
            cols[1].plotly_chart(ppl_figure(evals), width="stretch")
    if snapshots:
        snap = snapshots[-1]
        heads, chans = views.heads_matrix(snap), views.channels_matrix(snap)
        cols = st.columns(2)
        with cols[0].container(key="heads_heatmap"):
            st.plotly_chart(heatmap_figure(heads, "Keep probability of attention units", "head unit"),
                            width="stretch")
            st.caption(f"snapshot at step {snap['step']} · one row per layer, one cell per head unit")
        with cols[1].container(key="channels_heatmap"):
            st.plotly_chart(heatmap_figure(chans, "Keep probability of MLP channels (sorted, binned)",
                                           "channel bin (most kept first)"), width="stretch")
            st.caption(f"snapshot at step {snap['step']} · each row sorted, then averaged in 64 bins")
    if state.get("per_layer"):
        with st.container(key="layers_chart"):
            st.plotly_chart(layers_figure(state["per_layer"], "Per-layer kept fraction of the "
                                          + ("current hard mask" if state["live"] else "saved model")),
                            width="stretch")


def exports(state: dict) -> None:
    history, report = state["history"], state["report"]
    cols = st.columns(4)
    if report:
        cols[0].download_button("Report (JSON)", report_json(report), f"{run_id}-report.json", "application/json")
        st.success(f"Pruned model saved in `{manager.root / run_id / 'model'}`: achieved ratio "
                   f"{report['achieved_ratio']:.3f}, {report['params_after'] / 1e6:.1f} M parameters "
                   f"(from {report['params_before'] / 1e6:.1f} M). Compare it on the **Compare** page.")
    if history["steps"]:
        cols[1].download_button("Curves (CSV)", views.curves_csv(history["steps"]), f"{run_id}-curves.csv", "text/csv")
    if history["snapshots"]:
        snap = history["snapshots"][-1]
        cols[2].download_button("Heads heatmap (PNG)", views.heatmap_png(views.heads_matrix(snap), f"{run_id} heads",
                                "head unit"), f"{run_id}-heads.png", "image/png")
        cols[3].download_button("Channels heatmap (PNG)", views.heatmap_png(views.channels_matrix(snap),
                                f"{run_id} MLP channels", "channel bin"), f"{run_id}-channels.png", "image/png")


state = run_state()
if not state:
    st.warning(f"No run `{run_id}` here (deleted, or from another runs folder). Start a new one.")
    st.stop()

if state["live"]:
    @st.fragment(run_every=POLL_SECONDS)
    def live_view():
        now = run_state()
        render(now)
        if not now["live"]:
            st.rerun()  # the run ended: one full rerun shows the exports and stops the polling
    live_view()
else:
    render(state)
    exports(state)
