"""Probe: Probe Pruning at inference, batch by batch: what each batch kept, how the masks move, what it costs."""

import streamlit as st

from app_pages.common import (POLL_SECONDS, batch_times_figure, choices, current_model, draw, heatmap_figure,
                              mask_change_figure, show_error, studio)
from pruner import views
from pruner.errors import PrunerError
from pruner.probe import VARIANTS, ProbeConfig

st.title("Probe")
st.caption("Probe Pruning (Le et al., ICLR 2025) prunes each batch on the fly: a small probe (5% of the samples, "
           "half of the positions, picked by residual norm) runs through every block, its activations are fused "
           "with a calibration history, and the lowest-scoring query heads and MLP channels are sliced away for "
           "that batch only (layers 0-2 stay dense). Batches of validation windows; each is also run dense, "
           "one after the other, to time both.")
c = choices()
manager = studio()

with st.container(border=True):
    cols = st.columns([2, 1, 1, 1, 1, 1])
    ratio = cols[0].slider("Pruning ratio", 0.1, 0.6, 0.4, 0.05,
                           help="Share of query heads and MLP channels removed over the model")
    variant = cols[1].selectbox("Variant", VARIANTS,
                                help="probe: the method; full-batch: the whole batch is the probe (the oracle); "
                                     "fixed: fixed fusion weights")
    batches = cols[2].number_input("Batches", 1, 50, 4)
    batch_size = cols[3].number_input("Batch size", 1, 32, 8)
    seqlen = cols[4].selectbox("Sequence length", [32, 64, 128, 256], index=2)
    calib = cols[5].number_input("Calibration windows", 1, 512, 32, help="Train-split windows for the history")
    start, stop = st.columns(2)
    if start.button("Start", type="primary", width="stretch"):
        try:
            config = ProbeConfig(ratio=float(ratio), variant=variant, data=c["data"], calib_windows=int(calib))
            job = manager.start_probe(current_model(), config, int(batches), int(batch_size), int(seqlen))
            st.session_state["probe_job"] = job.id
        except PrunerError as exc:
            show_error(exc)
    job = manager.get_probe(st.session_state.get("probe_job", ""))
    if stop.button("Stop", width="stretch", disabled=job is None) and job is not None:
        job.stop()

if job is None:
    st.info("Press **Start** to run a few batches with Probe Pruning (one heavy job at a time).")
    st.stop()


def render(state: dict) -> None:
    st.markdown(f"Probe run `{state['id']}` is **{state['status']}**")
    if state["error"]:
        st.error(state["error"])
    st.progress(state["done"] / state["total"], text=f"batch {state['done']} / {state['total']}")
    totals = views.probe_totals(state["batches"])
    if not totals:
        return
    cols = st.columns(5)
    cols[0].metric("Perplexity", f"{totals['probe_ppl']:.2f}", delta=f"dense {totals['dense_ppl']:.2f}",
                   delta_color="off")
    cols[1].metric("Time ratio", f"{totals['time_ratio']:.3f}", help="probe-pruned / dense forward wall time")
    cols[2].metric("Time saved", f"{totals['saved_s']:.2f} s", help="dense minus probe-pruned, over these batches")
    cols[3].metric("Probe FLOPs", f"{100 * totals['probe_flops_share']:.2f}%",
                   help="analytic share of the dense decoder FLOPs spent on probing")
    cols[4].metric("Parameters unused", f"{totals['achieved_ratio']:.3f}",
                   help="share of decoder-linear parameters a batch ran without")
    shown = st.select_slider("Batch", options=[b["batch"] for b in state["batches"]],
                             value=state["batches"][-1]["batch"]) if len(state["batches"]) > 1 else 0
    batch = next(b for b in state["batches"] if b["batch"] == shown)
    cols = st.columns(2)
    with cols[0].container(key="probe_heads"):
        draw(heatmap_figure(batch["heads"], f"Query heads kept by batch {shown}", "query head"))
    with cols[1].container(key="probe_channels"):
        draw(heatmap_figure(views.binned_columns(batch["channels"], 64),
                            f"MLP channels kept by batch {shown} (64 bins by index)", "channel bin",
                            cell="bin"))
    cols = st.columns(2)
    with cols[0].container(key="probe_times"):
        draw(batch_times_figure(state["batches"]))
    if len(state["batches"]) > 1:
        skip = state["config"]["skip_layers"]
        heads = views.mask_changes([b["heads"][skip:] for b in state["batches"]])
        channels = views.mask_changes([b["channels"][skip:] for b in state["batches"]])
        with cols[1].container(key="probe_changes"):
            draw(mask_change_figure(heads, channels))


if job.is_alive:
    @st.fragment(run_every=POLL_SECONDS)
    def live_view():
        now = job.state()
        render(now)
        if not job.is_alive:
            st.rerun()
    live_view()
else:
    render(job.state())
