"""Compare: one prompt, the dense model, a pruned one and Probe Pruning side by side, streamed;
size, perplexity and speed."""

import threading

import pandas as pd
import streamlit as st

from app_pages.common import cached_model, choices, current_model, polled, show_error, studio
from pruner.errors import PrunerError
from pruner.evaluate import generate
from pruner.whatif import EVAL_SEQLEN, EVAL_WINDOWS, PROBE_CALIB_WINDOWS, WhatIf, describe_state, probe_comparison

ROWS = {"parameters": "parameters", "perplexity": "perplexity", "prefill_s": "prefill latency (ms, 1x128)",
        "decode_tokens_per_s": "decode tokens/s"}

st.title("Compare")
st.caption("The dense model next to a pruned one and, if you like, the dense model under Probe Pruning (each batch "
           "pruned on the fly), on the same prompt (greedy decoding), then their size, validation perplexity "
           f"({EVAL_WINDOWS} windows of {EVAL_SEQLEN} tokens) and speed on this machine, measured one at a time "
           "in the background (after any run that is going).")
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
cols = st.columns([1, 3])
with_probe = cols[0].toggle("Probe Pruning too", help="The dense model pruned batch by batch at inference "
                            f"(Probe Pruning; history calibrated on {PROBE_CALIB_WINDOWS} train windows)")
probe_ratio = cols[1].slider("Probe Pruning ratio", 0.1, 0.6, 0.4, 0.05, disabled=not with_probe,
                             help="Share of query heads and MLP channels each batch runs without")
prompt = st.text_area("Prompt", "The history of the printing press begins", height=80)
max_new = st.slider("New tokens", 8, 200, 48)
go = st.button("Generate", type="primary", disabled=not (path or with_probe))


def stream(produce, tokenizer, text: str, n: int):
    """Yield decoded pieces as `produce(text, n, streamer)` generates them (in a helper thread)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=produce, args=(text, n, streamer), daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def plain(loaded):
    return lambda text, n, streamer: generate(loaded.model, loaded.tokenizer, text, n, streamer)


@st.cache_resource(show_spinner="Calibrating Probe Pruning's history...", max_entries=2)
def probe_pruner(spec: str, device: str, dtype: str, data: str, ratio: float):
    """Compare's Probe Pruner for generation (`whatif.probe_comparison`, the one its card measures),
    and the lock that keeps two sessions from running it at once."""
    return *probe_comparison(cached_model(spec, device, dtype), ratio, data), threading.Lock()


def measured(requests: dict) -> None:
    """The model cards of `requests` ({column: WhatIf}) from the What-if queue (one heavy computation at
    a time: nothing is timed while a run goes), polled until all are in, as one table."""
    queue = studio().whatif
    wanted = list(requests.values())

    def show() -> None:
        cards = {name: queue.result(request) for name, request in requests.items()}
        if any(card is None for card in cards.values()):
            st.info(f"Measuring size, perplexity and speed: {describe_state(queue.state())}",
                    icon=":material/hourglass_top:")
            return
        for card in cards.values():
            if "error" in card:
                st.error(card["error"])
                return
        table = pd.DataFrame(cards).rename(index=ROWS)
        table.loc[ROWS["prefill_s"]] *= 1000
        for name in list(cards)[1:]:
            table[f"{name} / dense"] = table[name] / table["dense"]
        with st.container(key="compare_table"):
            styled = (table.style.format("{:,.2f}")
                      .format("{:,.0f}", subset=pd.IndexSlice[["parameters"], list(cards)])
                      .format("{:.3f}", subset=[f"{name} / dense" for name in list(cards)[1:]]))
            st.dataframe(styled, width="stretch")
        st.caption(f"Measured on {dense.device} ({c['dtype']}); latency is the median of 5 forwards, "
                   "decode speed excludes the prefill. Numbers on a shared machine are noisy: compare ratios. "
                   + (f"Probe Pruning's parameters are those a batch ran with (the mean over the {EVAL_WINDOWS} "
                      "windows in batches of 8); its latency includes the probe, its decoding runs on the "
                      "structure the prompt's probe chose." if "probe" in cards else ""))

    polled(queue, wanted, dense, show, wanted)


def outputs_view(outputs: list[tuple[str, str, str]]) -> None:
    """The generations of the last comparison, as they were streamed."""
    for column, (name, title, text) in zip(st.columns(len(outputs)), outputs):
        with column:
            st.subheader(title)
            with st.container(key=f"{name}_output", border=True):
                st.markdown(text)


session = (c["model_spec"], c["device"], c["dtype"], c["data"])
if go:
    shown = {f"Dense · {c['model_spec']}": ("dense", dense, plain(dense))}
    requests = {"dense": WhatIf.dense(*session, card=True)}
    try:
        if path:
            pruned = cached_model(path, c["device"], c["dtype"])
            shown["Pruned"] = ("pruned", pruned, plain(pruned))
            requests["pruned"] = WhatIf.saved(path, c["device"], c["dtype"], c["data"], card=True)
        if with_probe:
            loaded, pruner, lock = probe_pruner(*session, probe_ratio)

            def probed(text, n, streamer):
                with lock:
                    pruner.generate(loaded.tokenizer, text, n, streamer)
            shown[f"Probe Pruning · ratio {probe_ratio:.2f}"] = ("probe", loaded, probed)
            requests["probe"] = WhatIf.probe(*session, probe_ratio)
    except PrunerError as exc:
        show_error(exc)
        st.stop()
    outputs = []
    for column, (title, (name, loaded, produce)) in zip(st.columns(len(shown)), shown.items()):
        with column:
            st.subheader(title)
            with st.container(key=f"{name}_output", border=True):
                outputs.append((name, title, st.write_stream(stream(produce, loaded.tokenizer, prompt, max_new))))
    st.session_state["compare"] = {"session": session, "outputs": outputs, "requests": requests}
elif st.session_state.get("compare", {}).get("session") == session:  # a rerun: the last comparison
    outputs_view(st.session_state["compare"]["outputs"])
if st.session_state.get("compare", {}).get("session") == session:
    measured(st.session_state["compare"]["requests"])
