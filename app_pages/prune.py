"""Prune: settings, Start / Pause / Resume / Stop, and the live view of a run (its id is in the URL)."""

import streamlit as st

from app_pages.common import (POLL_SECONDS, budget_figure, cached_model, choices, draw,
                              current_model, heatmap_figure, layer_errors_figure, layers_figure, load_for_run,
                              loss_figure, polled, ppl_figure, report_json, show_error, studio, variance_figure)
from pruner import views
from pruner.config import ADMM_MASKS, RECONSTRUCT, WANDA_SP_STATS, PruneConfig
from pruner.errors import PrunerError
from pruner.methods import METHODS
from pruner.pg.config import PGConfig, pg_fields
from pruner.prune import per_layer_report
from pruner.space import GRANULARITIES
from pruner.sparsity_masks import parse_sparsity_type
from pruner.run_record import read_record
from pruner.studio import saved_history, saved_report
from pruner.whatif import EVAL_SEQLEN, EVAL_WINDOWS, WhatIf, describe_state

st.title("Prune")
c = choices()
manager = studio()
run_id = st.query_params.get("run")
SPARSITY_TYPES = ["unstructured", "2:4", "4:8"]


def opened_run_config() -> PruneConfig | None:
    """The settings of the run in the URL (live or on disk), shown in the form instead of the defaults."""
    if not run_id:
        return None
    job = manager.get(run_id)
    if job is not None:
        return job.config
    try:
        settings = read_record(manager.folder(run_id)).get("settings")
        return PruneConfig.from_dict({k: v for k, v in settings.items() if k != "model"}) if settings else None
    except PrunerError:
        return None


def knob_widget(f, value, col, key: str):
    """The form control of one PGConfig knob, from its metadata."""
    meta = f.metadata
    if isinstance(f.default, bool):
        return col.checkbox(meta["label"], value, help=meta["help"], key=key)
    if meta["choices"]:
        return col.selectbox(meta["label"], meta["choices"], index=meta["choices"].index(value), help=meta["help"], key=key)
    if isinstance(f.default, int):
        return int(col.number_input(meta["label"], int(meta["lo"]), int(meta["hi"]), int(value), help=meta["help"], key=key))
    return float(col.number_input(meta["label"], float(meta["lo"]), float(meta["hi"]), float(value), format="%.4g",
                                  help=meta["help"], key=key))


def pg_form(shown: PGConfig, suffix: str) -> dict:
    """Every policy-gradient knob as a form control, the advanced ones folded away."""
    values = {}
    for advanced in (False, True):
        group = [f for f in pg_fields() if f.metadata["advanced"] == advanced]
        holder = st.expander("Advanced search settings") if advanced else st.container()
        with holder:
            for start in range(0, len(group), 6):
                cols = st.columns(6)
                for f, col in zip(group[start:start + 6], cols):
                    values[f.name] = knob_widget(f, getattr(shown, f.name), col, f"pg_{f.name}{suffix}")
    return values


shown = opened_run_config() or PruneConfig(method="pg", granularity=c["granularity"], calib_windows=32)
suffix = f"_{run_id}" if run_id else ""

# ---- settings -------------------------------------------------------------------------------
with st.container(border=True):
    if run_id:
        st.caption(f"Settings of run `{run_id}`; change them and press Start for a new run.")
    cols = st.columns([1, 2, 1, 1, 1])
    names = list(METHODS)
    method = cols[0].selectbox("Method", names, index=names.index(shown.method), key=f"method{suffix}",
                               help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    sparse = METHODS[method].sparse
    granularity, sparsity_type, reconstruct, method_settings = shown.granularity, "unstructured", "none", {}
    if sparse:
        sparsity_type = cols[2].selectbox("Sparsity type", SPARSITY_TYPES, key=f"sparsity{suffix}",
                                          index=SPARSITY_TYPES.index(shown.sparsity_type)
                                          if shown.sparsity_type in SPARSITY_TYPES else 0,
                                          help="Which single weights may go: any (unstructured), or N of every M "
                                               "consecutive inputs (N:M). The result is a dense model with zeros.")
    else:
        granularity = cols[2].selectbox("Granularity", GRANULARITIES, index=GRANULARITIES.index(shown.granularity),
                                        key=f"granularity{suffix}")
    kind = parse_sparsity_type(sparsity_type)
    if kind.is_nm:
        ratio = kind.nm_sparsity
        cols[1].metric("Sparsity", f"{ratio:g}", help=f"{kind} zeroes {ratio:g} of every linear's weights")
    else:
        ratio = cols[1].slider("Pruning ratio", 0.05, 0.9, float(shown.ratio), 0.05, key=f"ratio{suffix}",
                               help="Fraction of every decoder linear's weights set to zero" if sparse else
                               "Fraction of decoder-linear parameters (q/k/v/o, gate/up/down) to remove")
    seed = cols[3].number_input("Seed", 0, 10**6, int(shown.seed), key=f"seed{suffix}")
    calib_windows = cols[4].number_input("Calibration windows", 1, 4096, int(shown.calib_windows),
                                         key=f"calib{suffix}",
                                         help="128-token windows of the train split for the metrics, the layer-by-"
                                              "layer statistics and a metric initialisation; more is steadier, slower")
    cols = st.columns([1, 2, 1, 1, 1])
    if not sparse:
        reconstruct = cols[0].selectbox("Reconstruct", RECONSTRUCT, index=RECONSTRUCT.index(shown.reconstruct),
                                        key=f"reconstruct{suffix}",
                                        help="After the mask is chosen, refit the kept columns of o_proj and "
                                             "down_proj and their bias layer by layer: ls (least squares) or admm "
                                             "(the ADMM fixed-mask update)")
    if method == "admm" or reconstruct == "admm":
        if method == "admm":
            method_settings["admm_mask"] = cols[1].selectbox(
                "ADMM mask", ADMM_MASKS, index=ADMM_MASKS.index(shown.admm_mask), key=f"admm_mask{suffix}",
                help="gradual: the paper's cubic ramp; reselect: the released code, the full-sparsity mask "
                     "re-chosen each iteration")
        method_settings["admm_iterations"] = int(cols[2].number_input(
            "ADMM iterations", 1, 10_000, int(shown.admm_iterations), key=f"admm_iterations{suffix}"))
    if reconstruct != "none":
        method_settings["refit_damp"] = float(cols[3].number_input(
            "Refit damping", 0.0, 100.0, float(shown.refit_damp), format="%.4g", key=f"refit_damp{suffix}",
            help="A ridge towards the original weights (ls: as a fraction of the kept inputs' mean variance; "
                 "admm: of each input's own variance): small fits the calibration windows closely (and may "
                 "overfit a few of them), large stays near the method's own weights and bias"))
    if method == "wanda-sp":
        method_settings["wanda_sp_stats"] = cols[1].selectbox(
            "Wanda-sp statistics", WANDA_SP_STATS, index=WANDA_SP_STATS.index(shown.wanda_sp_stats),
            key=f"wanda_sp_stats{suffix}", help="dense: input norms of the dense model (computed once, reused); "
                                                 "sequential: layer by layer through the already-pruned layers, "
                                                 "as the reference code does")
    pg_values = {}
    if method == "pg":
        st.markdown("**Policy-gradient settings** (defaults sized for the embedded model on a 2-core CPU)")
        pg_values = pg_form(shown.pg, suffix)

job = manager.get(run_id) if run_id else None

# ---- controls -------------------------------------------------------------------------------
cols = st.columns(4)
start = cols[0].button("Start", type="primary", width="stretch")
pause = cols[1].button("Pause", width="stretch", disabled=job is None)
resume = cols[2].button("Resume", width="stretch", disabled=run_id is None)
stop = cols[3].button("Stop", width="stretch", disabled=job is None)

if start:
    try:
        pg = PGConfig(**pg_values) if pg_values else PGConfig()
        config = PruneConfig(method=method, ratio=float(ratio), granularity=granularity, data=c["data"],
                             seed=int(seed), calib_windows=int(calib_windows), pg=pg, sparsity_type=sparsity_type,
                             reconstruct=reconstruct, **method_settings)
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
    st.info("Press **Start** to prune. The run goes on in the background (a `pg` search step by step, the "
            "unstructured / N:M methods and reconstructions layer by layer): charts update live, and you can "
            "switch pages or reload; the run's id stays in the URL.")
    st.stop()


# ---- the live view ----------------------------------------------------------------------------
@st.cache_resource(max_entries=4)
def _current_layers(job_id: str, step: int, status: str):
    """Per-layer kept fractions of a live run's hard mask, once per (run, step) for every session."""
    job = manager.get(job_id)
    pg = job.pg if job is not None else None  # read once: an ending job lets go of its search
    return per_layer_report(pg.space, pg.current_mask()) if pg is not None else None


def run_state() -> dict:
    """Status, progress and history of the URL's run, from memory when live, else from disk."""
    job = manager.get(run_id)
    if job is not None:
        info = job.info()
        history = job.history()
        current = _current_layers(run_id, info["step"], info["status"])
        return {"info": info, "history": history, "per_layer": current, "report": job.report, "live": job.is_alive,
                "layers": list(job.layers)}
    run_dir = manager.folder(run_id)
    if not run_dir.is_dir():
        return {}
    info = read_record(run_dir) | {"id": run_id}
    report = saved_report(run_dir)
    return {"info": info, "history": saved_history(run_dir), "report": report, "live": False,
            "per_layer": report["per_layer"] if report else None,
            "layers": report.get("weight_update", {}).get("per_layer", []) if report else []}


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
                    + (" — press Resume to continue from its checkpoint"
                       if status in ("stopped", "interrupted") and info.get("settings", {}).get("method") == "pg"
                       else ""))
        if status == "failed" and info.get("error"):
            st.error("The run failed; its traceback is below and on the Runs page.")
            st.code(info["error"])
    settings = info.get("settings", {})
    if settings.get("method") != "pg":
        result_view(state)
        return
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
    if steps or state["live"]:  # empty axes while the first step runs
        cols = st.columns(2)
        with cols[0].container(key="loss_chart"):
            draw(loss_figure(steps))
        with cols[1].container(key="variance_chart"):
            draw(variance_figure(steps))
            st.caption("Variance: mean over units of the variance across the K samples of each unit's "
                       "gradient term (L_j - baseline) * score(m_j, s).")
        cols = st.columns(2)
        with cols[0]:
            draw(budget_figure(steps))
        if evals:
            with cols[1]:
                draw(ppl_figure(evals))
                if "best_step" in evals[-1]:
                    st.caption(f"The search returns its best hard mask so far on the held-out calibration "
                               f"blocks: step {evals[-1]['best_step']} (perplexity "
                               f"{evals[-1]['best_holdout_ppl']:.1f} there; step 0 is the start).")
    if snapshots:
        snap = snapshots[-1]
        heads, chans = views.heads_matrix(snap), views.channels_matrix(snap)
        cols = st.columns(2)
        with cols[0].container(key="heads_heatmap"):
            draw(heatmap_figure(heads, "Keep probability of attention units", "head unit"))
            st.caption(f"snapshot at step {snap['step']} · one row per layer, one cell per head unit")
        with cols[1].container(key="channels_heatmap"):
            draw(heatmap_figure(chans, "Keep probability of MLP channels (sorted, binned)",
                                "channel bin (most kept first)", cell="bin"))
            st.caption(f"snapshot at step {snap['step']} · each row sorted, then averaged in 64 bins")
    if state.get("per_layer"):
        with st.container(key="layers_chart"):
            draw(layers_figure(state["per_layer"], "Per-layer kept fraction of the "
                               + ("current hard mask" if state["live"] else "saved model")))
    if state["layers"]:
        errors_chart(state["layers"], settings)


def errors_chart(layers: list[dict], settings: dict) -> None:
    what = "reconstruction" if settings.get("reconstruct", "none") != "none" else "weight update"
    with st.container(key="errors_chart"):
        draw(layer_errors_figure(layers, f"Per-layer relative output error, {what}"))
        st.caption("On the calibration inputs each layer sees after the earlier layers were pruned: before = the "
                   "final mask on the original weights (with FLAP's bias where the method compensates), after = "
                   "the updated weights.")


def result_view(state: dict) -> None:
    """Any run but a search: layers done (layer-by-layer runs), perplexity, per-layer charts."""
    info, layers, report = state["info"], state["layers"], state["report"]
    settings = info.get("settings", {})
    method = METHODS.get(settings.get("method"))
    if (method is not None and method.sparse) or settings.get("reconstruct", "none") != "none":
        step, total = info.get("step", 0), info.get("steps", 1)
        with st.container(key="run_progress"):
            st.progress(min(1.0, step / max(total, 1)), text=f"layer {step} / {total}")
            data = views.layer_errors(layers)
            cols = st.columns(4)
            cols[0].metric("Layers done", f"{len(layers)}")
            cols[1].metric("Mean error before", f"{sum(data['before']) / len(data['before']):.4f}" if data["before"] else "-")
            cols[2].metric("Mean error after", f"{sum(data['after']) / len(data['after']):.4f}" if data["after"] else "-")
            cols[3].metric("Time per layer", f"{sum(r['time_s'] for r in layers) / len(layers):.1f} s" if layers else "-")
    if report and info.get("has_model") and not state["live"]:
        with st.container(key="run_result"):
            measured(report, settings)
    if layers:
        errors_chart(layers, settings)
    if state.get("per_layer"):
        with st.container(key="layers_chart"):
            draw(layers_figure(state["per_layer"], "Per-layer kept fraction of the saved model"))


def measured(report: dict, settings: dict) -> None:
    """The saved model's validation perplexity next to its dense model's, from the What-if queue
    (one heavy computation at a time), polled until both are known."""
    spec = settings.get("model") or c["model_spec"]
    dense_model = cached_model(spec, c["device"], c["dtype"])
    saved = WhatIf.saved(str(manager.root / run_id / "model"), c["device"], c["dtype"], c["data"])
    dense = WhatIf.dense(spec, c["device"], c["dtype"], c["data"])
    queue = manager.whatif

    def show() -> None:
        pruned, base = queue.result(saved), queue.result(dense)
        if pruned is None or base is None:
            st.info(f"Measuring validation perplexity: {describe_state(queue.state())}",
                    icon=":material/hourglass_top:")
            return
        for result in (pruned, base):
            if "error" in result:
                st.error(result["error"])
                return
        cols = st.columns(4)
        cols[0].metric("Validation perplexity", f"{pruned['ppl']:.2f}", delta=f"{pruned['ppl'] / base['ppl']:.2f}x dense",
                       delta_color="off")
        cols[1].metric("Dense perplexity", f"{base['ppl']:.2f}")
        cols[2].metric("Achieved ratio", f"{report['achieved_ratio']:.3f}")
        cols[3].metric("Pruning time", f"{report['wall_time_s']:.1f} s")
        st.caption(f"{EVAL_WINDOWS} validation windows of {EVAL_SEQLEN} tokens; the What-if sweep shows this "
                   "run next to the metric methods.")
        if "storage" in report:
            st.info(f"Saved as {report['storage']}.")
    polled(queue, [saved, dense], dense_model, show, [saved, dense])


def exports(state: dict) -> None:
    history, report = state["history"], state["report"]
    cols = st.columns(4)
    if report:
        cols[0].download_button("Report (JSON)", report_json(report), f"{run_id}-report.json", "application/json")
        if "storage" in report:  # unstructured / N:M: zeros, nothing removed
            size = (f"{report['achieved_ratio']:.3f} of the decoder-linear parameters are zero, stored dense "
                    f"({report['params_after'] / 1e6:.1f} M parameters)")
        else:
            size = (f"achieved ratio {report['achieved_ratio']:.3f}, {report['params_after'] / 1e6:.1f} M parameters "
                    f"(from {report['params_before'] / 1e6:.1f} M)")
        st.success(f"Pruned model saved in `{manager.root / run_id / 'model'}`: {size}. "
                   "Compare it on the **Compare** page.")
    # files are made when a button is pressed (deferred), not on every rerun of the page
    if history["steps"]:
        cols[1].download_button("Curves (CSV)", lambda: views.curves_csv(history["steps"]), f"{run_id}-curves.csv",
                                "text/csv")
    if history["snapshots"]:
        snap = history["snapshots"][-1]
        cols[2].download_button("Heads heatmap (PNG)", lambda: views.heatmap_png(
            views.heads_matrix(snap), f"{run_id} heads", "head unit"), f"{run_id}-heads.png", "image/png")
        cols[3].download_button("Channels heatmap (PNG)", lambda: views.heatmap_png(
            views.channels_matrix(snap), f"{run_id} MLP channels", "channel bin"), f"{run_id}-channels.png", "image/png")


live_job = manager.get(run_id)
if live_job is not None and live_job.is_alive:  # the fragment reads the state itself, once per poll
    @st.fragment(run_every=POLL_SECONDS)
    def live_view():
        now = run_state()
        render(now)
        if not now["live"]:
            st.rerun()  # the run ended: one full rerun shows the exports and stops the polling
    live_view()
else:
    try:
        state = run_state()
    except PrunerError as exc:
        show_error(exc)
        st.stop()
    if not state:
        st.warning(f"No run `{run_id}` here (deleted, or from another runs folder). Start a new one.")
        st.stop()
    render(state)
    exports(state)
