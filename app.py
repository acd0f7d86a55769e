"""Pruner Studio: structural pruning of LLMs, watched live. `make app` opens it on localhost."""

import streamlit as st

from app_pages.common import choices, studio

st.set_page_config(page_title="Pruner Studio", layout="wide")

PAGES = [
    st.Page("app_pages/model.py", title="Model & data", icon=":material/database:", url_path="model", default=True),
    st.Page("app_pages/prune.py", title="Prune", icon=":material/content_cut:", url_path="prune"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("app_pages/whatif.py", title="What-if", icon=":material/tune:", url_path="whatif"),
    st.Page("app_pages/probe.py", title="Probe", icon=":material/bolt:", url_path="probe"),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/history:", url_path="runs"),
]

page = st.navigation(PAGES)
c = choices()
with st.sidebar:
    st.caption(f"Model **{c['model_spec']}** · corpus **{c['data']}** · device {c['device']} · dtype {c['dtype']}")
    active = studio().active()
    if active is not None:
        step, steps = active.progress()  # as of this page load; the Prune page shows it live
        st.caption(f"Run `{active.id}`: {active.status}, step {step} / {steps} when this page loaded")
page.run()
