"""Pruner Studio: structural pruning of LLMs, watched live. `make app` opens it on localhost."""

from pathlib import Path

import pruner  # noqa: F401  (before streamlit and torch: its OpenMP setting must precede torch)
import streamlit as st

from app_pages.common import choices, studio

ICONS = Path(__file__).parent / "app_pages" / "icons"

PAGES = [
    st.Page("app_pages/model.py", title="Model & data", icon=":material/database:", url_path="model", default=True),
    st.Page("app_pages/prune.py", title="Prune", icon=":material/content_cut:", url_path="prune"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("app_pages/whatif.py", title="What-if", icon=":material/tune:", url_path="whatif"),
    st.Page("app_pages/probe.py", title="Probe", icon=":material/bolt:", url_path="probe"),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/history:", url_path="runs"),
]


def favicon(page) -> Path:
    """The page's ":material/<name>:" icon as a local SVG, which Streamlit inlines as a data: URL. Left to
    itself, Streamlit would load the browser-tab icon of such a page from a public font host."""
    return ICONS / f"{page.icon.removeprefix(':material/').removesuffix(':')}.svg"


# A favicon set before st.navigation keeps Streamlit from picking the page's icon itself; the second call
# gives the tab the icon of the page actually shown.
st.set_page_config(page_title="Pruner Studio", page_icon=favicon(PAGES[0]), layout="wide")
page = st.navigation(PAGES)
st.set_page_config(page_icon=favicon(page))
c = choices()
with st.sidebar:
    st.caption(f"Model **{c['model_spec']}** · corpus **{c['data']}** · device {c['device']} · dtype {c['dtype']}")
    active = studio().active()
    if active is not None:
        step, steps = active.progress()  # as of this page load; the Prune page shows it live
        st.caption(f"Run `{active.id}`: {active.status}, step {step} / {steps} when this page loaded")
page.run()
