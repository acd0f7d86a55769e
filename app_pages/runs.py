"""Runs: every run on disk with its settings and results; reopen, resume, delete."""

import time

import pandas as pd
import streamlit as st

from app_pages.common import load_for_run, show_error, studio
from pruner.errors import PrunerError
from pruner.studio import saved_report

st.title("Runs")
manager = studio()
st.caption(f"Runs live in `{manager.root}`. A run that was going when its process ended shows as "
           "*interrupted*: resume it from its last checkpoint.")
runs = manager.runs()
if not runs:
    st.info("No runs yet: start one on the **Prune** page.")
    st.stop()

rows = []
for info in runs:
    s = info.get("settings", {})
    report = saved_report(info["dir"]) if info.get("has_model") else None
    rows.append({"run": info["id"], "status": info.get("status"), "method": s.get("method"), "ratio": s.get("ratio"),
                 "granularity": s.get("granularity"), "model": s.get("model"), "data": s.get("data"),
                 "step": f"{info.get('step', 0)} / {info.get('steps', '?')}",
                 "achieved ratio": report["achieved_ratio"] if report else None,
                 "params after (M)": report["params_after"] / 1e6 if report else None,
                 "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("updated", 0)))})
with st.container(key="runs_table"):
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

ids = [info["id"] for info in runs]
chosen = st.selectbox("Run", ids)
info = runs[ids.index(chosen)]
cols = st.columns(3)
if cols[0].button("Open", type="primary", width="stretch"):
    st.query_params["run"] = chosen
    st.switch_page("app_pages/prune.py", query_params={"run": chosen})
if cols[1].button("Resume", width="stretch", disabled=info.get("settings", {}).get("method") != "pg"):
    try:
        manager.resume(chosen, load_for_run)
        st.switch_page("app_pages/prune.py", query_params={"run": chosen})
    except PrunerError as exc:
        show_error(exc)
if cols[2].button("Delete", width="stretch"):
    try:
        manager.delete(chosen)
        st.rerun()
    except PrunerError as exc:
        show_error(exc)

with st.expander("Settings", expanded=False):
    st.json(info.get("settings", {}))
if info.get("status") == "failed" and info.get("error"):
    st.error("This run failed:")
    st.code(info["error"])
