import streamlit as st

from pruner.adapters import supported_architectures

st.set_page_config(page_title="Pruner Studio")
st.title("Pruner Studio")
st.write("Structural pruning of LLMs. Supported architectures: " + ", ".join(supported_architectures()))
st.write("Use the CLI: `.venv/bin/python -m pruner --help`. The full studio is in progress.")
