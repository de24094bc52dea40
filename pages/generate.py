"""Generate: type a prompt, watch it stream, stop it, see what it cost."""

from __future__ import annotations

import time

import streamlit as st

from core import prices
from core.errors import CircuitOpen, GyroscopeError
from core.models import GenerationRequest, RetryNotice, Thinking
from core.ui_batch import render as render_batch_tab
from core.ui import get_gyro, provider_badge, show_error, show_thinking

gyro = get_gyro()
s = gyro.settings.snapshot()
state = st.session_state
state.setdefault("generations", [])   # this session's results, oldest first
state.setdefault("paused_until", 0.0)

st.title("Generate")
provider_badge(gyro)

# Lazy tabs (on_change="rerun"): only the open tab's code runs. The single-prompt part of
# the page draws below the tab bar, so it needs no indenting into the first tab.
_single_tab, batch_tab = st.tabs(["Single prompt", "Batch"], key="generate_tab", on_change="rerun")
if batch_tab.open:
    with batch_tab:
        render_batch_tab(gyro)
    st.stop()

prompt = st.text_area("Prompt", key="prompt", height=160,
                      placeholder="What should be written? e.g. A friendly launch email for our new app")
with st.expander("Options"):
    models = gyro.models()
    model = st.selectbox("Model", models, index=0, key="model")
    c1, c2 = st.columns(2)
    temperature = c1.slider("Temperature", 0.0, 2.0, float(s["generate.temperature"]), 0.05, key="temperature")
    max_tokens = c2.number_input("Max tokens", 1, 128_000, int(s["generate.max_tokens"]), key="max_tokens")
    system = st.text_area("System prompt (optional)", key="system", height=80)
    c3, c4 = st.columns(2)
    seed_text = c3.text_input("Seed (optional, whole number)", key="seed")
    use_cache = c4.toggle("Use the response cache", value=bool(s["cache.enabled"]), key="use_cache")

optimize = st.toggle("Optimize prompt", value=bool(s["optimizer.enabled"]), key="optimize",
                     help="Removes filler, repeats and extra whitespace; never touches code, "
                          "quotes, numbers or negations.")
preview = gyro.optimize_preview(prompt, model) if optimize and prompt.strip() else None
if preview is not None:
    if preview.changed:
        saved_cost = prices.cost(model, preview.tokens_saved, 0) or 0.0
        st.caption(f"Optimized prompt saves **{preview.tokens_saved} tokens** "
                   f"({preview.saved_ratio:.0%}, ${saved_cost:.6f} per request).")
        with st.expander("Optimized prompt and changes"):
            st.code(preview.optimized, language=None, wrap_lines=True)
            st.code(preview.diff(), language="diff")
    else:
        st.caption("The optimizer found nothing to remove.")

seed = None
if seed_text.strip():
    try:
        seed = int(seed_text)
    except ValueError:
        st.warning("The seed must be a whole number, like 42. Leave it empty for none.")

sent_prompt = preview.optimized if preview is not None else prompt
too_long = False
if prompt.strip():
    est = gyro.estimate(sent_prompt, system or None, model, int(max_tokens))
    cost_text = "unknown price for this model" if est["max_cost"] is None else f"at most ${est['max_cost']:.6f}"
    limit = f" of {est['context_window']:,}" if est["context_window"] else ""
    st.caption(f"About **{est['prompt_tokens']:,}** prompt tokens{limit} · {cost_text}")
    too_long = est["too_long"]
    if too_long:
        st.warning(f"The prompt has {est['prompt_tokens']:,} tokens; with up to {int(max_tokens):,} tokens "
                   f"of answer that exceeds {model}'s limit of {est['context_window']:,}. Shorten the "
                   "prompt or lower Max tokens.")


@st.fragment(run_every=1.0)
def paused_countdown() -> None:
    left = state.paused_until - time.time()
    if left > 0:
        st.warning(CircuitOpen(retry_in_s=left).user_message, icon=":material/pause_circle:")


paused_countdown()

col_go, col_stop, _ = st.columns([1, 1, 4])
go = col_go.button("Generate", type="primary", disabled=not prompt.strip() or too_long or
                   (seed_text.strip() != "" and seed is None), key="go")
col_stop.button("Stop", key="stop", help="Stops the answer at once; what arrived stays.")
regenerate = state.pop("regenerate", False)
if not prompt.strip():
    st.caption("Type a prompt to start.")


def run(refresh: bool) -> None:
    req = GenerationRequest(prompt=prompt, system=system or None, model=model,
                            temperature=float(temperature), max_tokens=int(max_tokens), seed=seed,
                            cache=use_cache, refresh=refresh, optimize=optimize, source="page")
    entry = {"prompt": prompt, "model": model, "content": "", "reasoning": "", "result": None,
             "error": None, "at": time.strftime("%H:%M:%S")}
    state.generations.append(entry)
    notice_box = st.empty()
    thinking_box = st.empty()      # a reasoning model's thinking, above (and apart from) the answer
    heartbeat = st.empty()
    stream = gyro.stream(req, events=True)

    def text():
        for piece in stream:
            if piece is None:          # nothing yet: touching the page lets a Stop get through
                heartbeat.empty()
                continue
            if isinstance(piece, RetryNotice):
                notice_box.info(piece.message, icon=":material/autorenew:")
                continue
            if isinstance(piece, Thinking):
                entry["reasoning"] += piece.text
                show_thinking(thinking_box.container(), entry["reasoning"], live=not entry["content"])
                continue
            if not entry["content"] and entry["reasoning"]:   # the answer starts: fold the thinking
                show_thinking(thinking_box.container(), entry["reasoning"])
            entry["content"] += piece
            yield piece
        notice_box.empty()

    try:
        st.write_stream(text())
    except GyroscopeError as exc:
        notice_box.empty()
        entry["error"] = exc
        if isinstance(exc, CircuitOpen):
            state.paused_until = time.time() + (exc.retry_in_s or 0)
            st.rerun()
        show_error(exc)
    finally:
        stream.close()      # a Stop (rerun) lands here: upstream closed, row 'cancelled'
        entry["result"] = stream.result


if go or regenerate:
    run(refresh=bool(regenerate))

latest = state.generations[-1] if state.generations else None
if latest is not None and not (go or regenerate):
    # A rerun while a generation runs (Stop, or any widget) interrupts it; Streamlit may start
    # this run before the interrupted one has finished closing, so show what arrived so far.
    r = latest["result"]
    show_thinking(st, latest.get("reasoning", ""))
    st.markdown(latest["content"] or "_(nothing arrived)_")
    if r is None or r.outcome == "cancelled":
        st.caption("Stopped — the text above is what arrived.")
    elif latest["error"] is not None:
        show_error(latest["error"])
if latest is not None and latest["result"] is not None:
    r = latest["result"]
    if r.usage is not None:
        cost = "unknown" if r.cost is None else f"${r.cost:.6f}"
        est = " (estimated)" if r.tokens_estimated else ""
        st.caption(f"{r.usage.prompt_tokens:,} + {r.usage.completion_tokens:,} tokens{est} · {cost} · "
                   f"{r.latency_ms:,.0f} ms · {r.attempts} attempt(s)")
    if r.from_cache:
        st.success(f"From cache — saved ${r.cost_saved:.6f}", icon=":material/bolt:")
        if st.button("Regenerate (bypass the cache)", key="regen"):
            state.regenerate = True
            st.rerun()
if latest is not None and latest["content"]:
    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button("Download .md", latest["content"], file_name="generation.md", key="dl_md")
    d2.download_button("Download .txt", latest["content"], file_name="generation.txt", key="dl_txt")
    with st.expander("Copy"):
        st.code(latest["content"], language=None, wrap_lines=True)

if len(state.generations) > 1:
    st.subheader("This session")
    for i, g in enumerate(reversed(state.generations[:-1])):
        r = g["result"]
        label = f"{g['at']} · {g['model']} · {g['prompt'][:60]}"
        if r is not None and r.outcome != "ok":
            label += f" · {r.outcome}"
        with st.expander(label):
            if g.get("reasoning"):      # expanders do not nest: the thinking as a caption
                st.caption(f"Thinking: {g['reasoning']}")
            st.markdown(g["content"] or "_(nothing arrived)_")
