"""Compare: one prompt, the dense and a pruned model side by side, streamed; size, perplexity and speed."""

import threading

import pandas as pd
import streamlit as st

from app_pages.common import cached_model, choices, current_model, show_error, studio
from pruner.errors import PrunerError
from pruner.evaluate import decode_tokens_per_s, generate, perplexity, prefill_latency, total_params
from pruner.windows import corpus_windows

st.title("Compare")
st.caption("The dense model and a pruned one on the same prompt (greedy decoding), then their size, "
           "validation perplexity (16 windows of 128 tokens) and speed on this machine.")
c = choices()
dense = current_model()

finished = [r for r in studio().runs() if r.get("has_model")]
OTHER = "A local directory..."
options = [r["id"] for r in finished] + [OTHER]
labels = {r["id"]: f"{r['id']} · {r.get('settings', {}).get('method', '?')} · ratio {r.get('settings', {}).get('ratio', '?')}"
          for r in finished}
choice = st.selectbox("Pruned model", options, format_func=lambda o: labels.get(o, o),
                      help="Runs that saved a model (finished or stopped), newest first")
path = st.text_input("Directory of a pruned model") if choice == OTHER else str(studio().root / choice / "model")
prompt = st.text_area("Prompt", "The history of the printing press begins", height=80)
max_new = st.slider("New tokens", 8, 200, 48)
go = st.button("Generate", type="primary", disabled=not path)


def stream(model, tokenizer, text: str, n: int):
    """Yield decoded pieces as `generate` produces them (generation runs in a helper thread)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=generate, args=(model, tokenizer, text, n, streamer), daemon=True)
    thread.start()
    yield from streamer
    thread.join()


@st.cache_data(show_spinner=False, max_entries=16)
def measure(spec: str, device: str, dtype: str, data: str) -> dict:
    loaded = cached_model(spec, device, dtype)
    windows = corpus_windows(loaded.tokenizer, data, "validation", 128, 16)
    return {"parameters": total_params(loaded.model), "perplexity": perplexity(loaded.model, windows)["ppl"],
            "prefill latency (ms, 1x128)": 1000 * prefill_latency(loaded.model, 128),
            "decode tokens/s": decode_tokens_per_s(loaded.model)}


if go:
    try:
        pruned = cached_model(path, c["device"], c["dtype"])
    except PrunerError as exc:
        show_error(exc)
        st.stop()
    left, right = st.columns(2)
    with left:
        st.subheader(f"Dense · {c['model_spec']}")
        with st.container(key="dense_output", border=True):
            st.write_stream(stream(dense.model, dense.tokenizer, prompt, max_new))
    with right:
        st.subheader("Pruned")
        with st.container(key="pruned_output", border=True):
            st.write_stream(stream(pruned.model, pruned.tokenizer, prompt, max_new))
    with st.spinner("Measuring size, perplexity and speed..."):
        try:
            a = measure(c["model_spec"], c["device"], c["dtype"], c["data"])
            b = measure(path, c["device"], c["dtype"], c["data"])
        except PrunerError as exc:
            show_error(exc)
            st.stop()
    table = pd.DataFrame({"dense": a, "pruned": b})
    table["pruned / dense"] = table["pruned"] / table["dense"]
    with st.container(key="compare_table"):
        styled = (table.style.format("{:,.2f}")
                  .format("{:,.0f}", subset=pd.IndexSlice[["parameters"], ["dense", "pruned"]])
                  .format("{:.3f}", subset=["pruned / dense"]))
        st.dataframe(styled, width="stretch")
    st.caption(f"Measured now on {dense.device} ({c['dtype']}); latency is the median of 5 forwards, "
               "decode speed excludes the prefill. Numbers on a shared machine are noisy: compare ratios.")
