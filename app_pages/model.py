"""Model & data: choose the model, corpus, device and dtype; see the architecture and the prunable units."""

import pandas as pd
import streamlit as st
import torch

from app_pages.common import DEFAULTS, cached_model, choices, show_error
from pruner.adapters import supported_architectures
from pruner.corpus import CORPORA, load_text
from pruner.errors import PrunerError
from pruner.models import model_summary
from pruner.space import GRANULARITIES, PruningSpace

st.title("Model & data")
st.caption("Pick what to prune and what to calibrate on. The defaults (the embedded SmolLM2-135M and the "
           "Brown corpus) work offline; go to **Prune** and press Start.")

c = choices()
SOURCES = {"embedded": "Embedded SmolLM2-135M-Instruct", "local": "Local directory", "hub": "Hub id"}
current_source = "embedded" if c["model_spec"] == "embedded" else (
    "local" if c["model_spec"].startswith(("/", ".", "~")) else "hub")

with st.form("choose"):
    source = st.radio("Model", list(SOURCES), format_func=SOURCES.get, horizontal=True,
                      index=list(SOURCES).index(current_source))
    location = st.text_input("Local directory or hub id (ignored for the embedded model)",
                             value="" if c["model_spec"] == "embedded" else c["model_spec"],
                             placeholder="/path/to/checkpoint  or  HuggingFaceTB/SmolLM2-360M")
    corpus_options = [*CORPORA, "text file"]
    data_is_file = c["data"] not in CORPORA
    cols = st.columns(4)
    corpus = cols[0].selectbox("Corpus", corpus_options, index=len(CORPORA) if data_is_file else list(CORPORA).index(c["data"]),
                               help="brown is embedded; wikitext2 and c4 need the dataset hub; or a .txt file")
    devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    device = cols[1].selectbox("Device", devices, index=devices.index(c["device"]) if c["device"] in devices else 0)
    dtypes = ["auto", "fp32", "bf16", "fp16"]
    dtype = cols[2].selectbox("Dtype", dtypes, index=dtypes.index(c["dtype"]),
                              help="auto: fp32 on CPU, bf16 on GPU")
    granularity = cols[3].selectbox("Granularity", GRANULARITIES, index=GRANULARITIES.index(c["granularity"]),
                                    help="kv_group: a k/v head with its query heads; query_head: single query heads "
                                         "(same count in every group); block: whole attention / MLP sublayers")
    text_path = st.text_input("Text file (when the corpus is a text file)", value=c["data"] if data_is_file else "")
    submitted = st.form_submit_button("Use these settings", type="primary")

if submitted:
    spec = "embedded" if source == "embedded" else location.strip()
    data = text_path.strip() if corpus == "text file" else corpus
    if not spec:
        st.error("Enter a local directory or a hub id, or choose the embedded model.")
    elif corpus == "text file" and not data:
        st.error("Enter the path of a text file, or choose a corpus.")
    else:
        try:
            with st.spinner(f"Loading {spec}..."):
                cached_model(spec, device, dtype)
            load_text(data, "validation")
        except PrunerError as exc:
            show_error(exc)
        else:
            st.session_state.update(model_spec=spec, data=data, device=device, dtype=dtype, granularity=granularity)
            c = choices()
            st.success(f"Using {spec} with {data}.")

if st.button("Back to the defaults"):
    st.session_state.update(DEFAULTS)
    st.rerun()

try:
    loaded = cached_model(c["model_spec"], c["device"], c["dtype"])
    summary = model_summary(loaded, c["granularity"])
except PrunerError as exc:
    show_error(exc)
    st.info(f"Supported architectures: {', '.join(supported_architectures())}.")
    st.stop()

st.subheader(f"{c['model_spec']} · {summary['architecture']}")
cols = st.columns(6)
cols[0].metric("Layers", summary["layers"])
cols[1].metric("Query heads", str(summary["heads"]))
cols[2].metric("KV heads", str(summary["kv_heads"]))
cols[3].metric("Head dim", summary["head_dim"])
cols[4].metric("MLP channels", str(summary["intermediate_size"]))
cols[5].metric("Device · dtype", f"{summary['device']} · {summary['dtype']}")
cols = st.columns(3)
cols[0].metric("Total parameters", f"{summary['total_params'] / 1e6:.1f} M")
cols[1].metric("Decoder-linear parameters", f"{summary['decoder_linear_params'] / 1e6:.1f} M",
               help="What the pruning ratio refers to: q/k/v/o and gate/up/down of every layer")
cols[2].metric("Prunable units", f"{summary['units']['head_units']} heads · {summary['units']['channel_units']} channels")

space = PruningSpace.from_model(loaded.model, loaded.adapter, c["granularity"])
chosen = f"`{c['granularity']}` (here: `{space.granularity}`)" if c["granularity"] == "auto" else f"`{space.granularity}`"
st.markdown(f"**Prunable units at granularity {chosen}** — parameters removed with each unit (weights and biases). "
            + " · ".join(f"`{g}`: {text}" for g, text in summary["attention_unit_by_granularity"].items()))
st.dataframe(pd.DataFrame([{
    "layer": l, "query heads": s.n_q, "kv heads": s.n_kv, "MLP channels": s.d_ff,
    "head units": space.n_head_units(l), "params per head unit": space.head_unit_cost(l),
    "channel units": space.n_channel_units(l), "params per channel unit": space.channel_unit_cost(l),
    "layer params": space.layer_params(s, l)} for l, s in enumerate(space.shapes)]),
    hide_index=True, height=260)

try:
    n_chars = len(load_text(c["data"], "validation"))
    st.caption(f"Corpus **{c['data']}**: validation split {n_chars:,} characters; calibration and the search "
               "read the train split, perplexity the validation (studio) or test (benchmarks) split.")
except PrunerError as exc:
    show_error(exc)
