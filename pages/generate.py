"""Generate: type a prompt, watch it stream, stop it, see what it cost."""

from __future__ import annotations

import time

import streamlit as st

from core import display, prices
from core.errors import CircuitOpen, GyroscopeError
from core.models import GenerationRequest, RetryNotice, Thinking
from core.ui import get_gyro, hold_shortcut, provider_badge, show_answer, show_error, show_thinking, viewer_zone
from core.ui_batch import render as render_batch_tab

gyro = get_gyro()
s = gyro.settings.snapshot()
state = st.session_state
state.setdefault("generations", [])   # this session's results, oldest first
state.setdefault("paused_until", 0.0)
zone = viewer_zone()


def _start(refresh: bool = False) -> None:
    # A callback, so the click counts in the very run it starts: the Generate button is
    # never disabled waiting for the prompt box to commit its text (one click generates).
    state.start = {"refresh": refresh}


# Set only in the run that streams: any other run (a Stop, any widget) is idle again.
starting = state.pop("start", None)

st.title("Generate")
provider_badge(gyro)

# Lazy tabs (on_change="rerun"): only the open tab's code runs. The single-prompt part of
# the page draws below the tab bar, so it needs no indenting into the first tab.
_single_tab, batch_tab = st.tabs(["Single prompt", "Batch"], key="generate_tab", on_change="rerun")
if batch_tab.open:
    with batch_tab:
        render_batch_tab(gyro)
    st.stop()

hold_shortcut("go", "prompt")     # a Ctrl+Enter typed before the Generate button is drawn still sends
                                  # (the page shell holds it from the start: this is its fallback)
prompt = st.text_area("Prompt", key="prompt", height=160,
                      placeholder="What should be written? e.g. A friendly launch email for our new app",
                      help="Press Ctrl+Enter (⌘+Enter on a Mac) or click Generate to send it. While "
                           "the answer arrives, Stop ends it at once; what arrived stays.")
with st.expander("Options"):
    models, model_note = gyro.model_menu()
    model = st.selectbox("Model", models, index=0, key="model",
                         help="Which AI model writes the answer; the list comes from the AI service.")
    if model_note:
        st.caption(model_note)
    c1, c2 = st.columns(2)
    temperature = c1.slider("Temperature", 0.0, 2.0, float(s["generate.temperature"]), 0.05, key="temperature",
                            help="How adventurous the wording is: 0 gives the most predictable answer, "
                                 "higher values more varied (and sometimes odd) ones. 0.7 suits most writing.")
    max_tokens = c2.number_input("Max tokens", 1, 128_000, int(s["generate.max_tokens"]), key="max_tokens",
                                 help="The longest the answer may be, in tokens (a token is about ¾ of a "
                                      "word, so 500 tokens ≈ 375 words). The answer stops there, which "
                                      "also caps its cost.")
    system = st.text_area("System prompt (optional)", key="system", height=80,
                          help="Standing instructions for the answer, e.g. \"You write for a bakery; "
                               "be warm and brief.\"")
    c3, c4 = st.columns(2)
    seed_text = c3.text_input("Seed (optional, whole number)", key="seed",
                              help="The same seed with the same prompt and options usually gives the "
                                   "same answer again (where the AI service supports it). Leave empty "
                                   "for a fresh answer each time.")
    use_cache = c4.toggle("Use saved answers", value=bool(s["cache.enabled"]), key="use_cache",
                          help="Answer a request made before from the saved answers, at no cost.")

optimize = st.toggle("Optimize prompt", value=bool(s["optimizer.enabled"]), key="optimize",
                     help="Removes filler, repeats and extra whitespace; never touches code, "
                          "quotes, numbers or negations.")
preview = gyro.optimize_preview(prompt, model) if optimize and prompt.strip() else None
if preview is not None:
    if preview.changed:
        saved_cost = prices.cost(model, preview.tokens_saved, 0) or 0.0
        st.caption(f"Optimized prompt saves **{preview.tokens_saved} tokens** "
                   f"({preview.saved_ratio:.0%}, {display.money(saved_cost)} per request).")
        with st.expander("Optimized prompt and changes"):
            before, after = st.columns(2)
            before.markdown("**Your prompt**")
            before.code(preview.original, language=None, wrap_lines=True)
            after.markdown("**What is sent**")
            after.code(preview.optimized, language=None, wrap_lines=True)
            st.markdown("**Changes**")
            for removed, added in display.prompt_changes(preview.original, preview.optimized):
                if not removed.strip() and not added.strip():
                    st.caption("· extra spacing tidied")
                elif not added.strip():
                    st.caption(f"· removed “{removed.strip()}”")
                else:
                    st.caption(f"· “{removed.strip()}” → “{added.strip()}”")
    else:
        st.caption("The optimizer found nothing to remove.")

seed = None
bad_seed = False
if seed_text.strip():
    try:
        seed = int(seed_text)
    except ValueError:
        bad_seed = True
        st.warning("The seed must be a whole number, like 42. Leave it empty for none.")

sent_prompt = preview.optimized if preview is not None else prompt
too_long = False
if prompt.strip():
    est = gyro.estimate(sent_prompt, system or None, model, int(max_tokens))
    cost_text = ("unknown price for this model" if est["max_cost"] is None
                 else f"costs at most {display.money(est['max_cost'])}")
    limit = f" (this model takes up to {est['context_window']:,})" if est["context_window"] else ""
    st.caption(f"About **{est['prompt_tokens']:,}** tokens to send{limit} · {cost_text}")
    too_long = est["too_long"]
    if too_long:
        st.warning(f"The prompt has {est['prompt_tokens']:,} tokens; with up to {int(max_tokens):,} tokens "
                   f"of answer that exceeds {model}'s limit of {est['context_window']:,}. Shorten the "
                   "prompt or lower Max tokens.")


def paused_countdown() -> None:
    left = state.paused_until - time.time()
    if left > 0:
        st.warning(CircuitOpen(retry_in_s=left).message_in(zone), icon=":material/pause_circle:")
    else:
        st.rerun()      # the pause is over: one full run draws the page idle and stops the timer


# The countdown ticks only while a pause runs: a timer at all times made every idle
# Generate tab rerun a fragment on the server each second.
if state.paused_until > time.time():
    st.fragment(run_every=1.0)(paused_countdown)()

refusal = None
if starting:
    if not prompt.strip():
        refusal = "Type a prompt first, then Generate."
    elif bad_seed:
        refusal = "Fix the seed first (a whole number, or empty)."
    elif too_long:
        refusal = "Shorten the prompt or lower Max tokens first."
    if refusal:
        starting = None
elif not prompt.strip() and not state.generations:
    st.caption("Type a prompt to start.")

# A row of buttons each as wide as its label (fixed columns cut "Generate  Ctrl + Enter").
col_go = col_stop = st.container(horizontal=True)
# While an answer streams, Generate shows it is busy and Stop is the one action to take.
col_go.button("Writing…" if starting else "Generate", key="go", type="secondary" if starting else "primary",
              disabled=bool(starting), on_click=_start, shortcut="Ctrl+Enter",
              icon=":material/hourglass_top:" if starting else None, width="content")
col_stop.button("Stop", key="stop", type="primary" if starting else "secondary", disabled=not starting,
                icon=":material/stop_circle:", width="content")
if refusal:
    st.warning(refusal, icon=":material/edit:")



def run(refresh: bool) -> None:
    req = GenerationRequest(prompt=prompt, system=system or None, model=model,
                            temperature=float(temperature), max_tokens=int(max_tokens), seed=seed,
                            cache=use_cache, refresh=refresh, optimize=optimize, source="page")
    entry = {"prompt": prompt, "model": model, "content": "", "reasoning": "", "result": None,
             "error": None, "at": time.time()}
    state.generations.append(entry)
    notice_box = st.empty()
    thinking_box = st.empty()      # a reasoning model's thinking, above (and apart from) the answer
    answer_box = st.empty()
    heartbeat = st.empty()
    stream = gyro.stream(req, events=True)
    try:
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
            show_answer(answer_box, entry["content"])
    except GyroscopeError as exc:
        entry["error"] = exc
        if isinstance(exc, CircuitOpen):
            state.paused_until = time.time() + (exc.retry_in_s or 0)
    finally:
        stream.close()      # a Stop (rerun) lands here: upstream closed, row 'cancelled'
        entry["result"] = stream.result
    # Draw the page again idle: Generate back, and the answer in "This session" at once.
    st.rerun()


if starting:
    run(refresh=bool(starting.get("refresh")))

latest = state.generations[-1] if state.generations else None
if latest is not None:
    # A rerun while a generation runs (Stop, or any widget) interrupts it; Streamlit may start
    # this run before the interrupted one has finished closing, so show what arrived so far.
    r = latest["result"]
    show_thinking(st, latest.get("reasoning", ""))
    if latest["content"] or latest["error"] is None:
        show_answer(st, latest["content"])
    if r is None or r.outcome == "cancelled":
        st.caption("Stopped — the text above is what arrived.")
    elif latest["error"] is not None:
        show_error(latest["error"])
if latest is not None and latest["result"] is not None:
    r = latest["result"]
    if r.outcome in ("ok", "cancelled") and (r.usage is not None or r.from_cache):
        st.caption(display.result_line(r))
    if r.from_cache:
        st.success(f"From the saved answers — no cost (saved {display.money(r.cost_saved)}).",
                   icon=":material/bolt:")
        st.button("Write a new answer instead", key="regen", on_click=_start, kwargs={"refresh": True},
                  help="Asks the AI service again instead of using the saved answer.")
if latest is not None and latest["content"]:
    d1 = d2 = st.container(horizontal=True)
    d1.download_button("Download .md", latest["content"], file_name="generation.md", key="dl_md")
    d2.download_button("Download .txt", latest["content"], file_name="generation.txt", key="dl_txt")
    with st.expander("Copy the whole answer"):
        st.code(latest["content"], language=None, wrap_lines=True)

if state.generations:
    st.subheader("This session")
    st.caption(f"Newest first; times in {display.zone_name(zone)}.")
    for g in reversed(state.generations):
        r = g["result"]
        label = f"{display.clock_time(g['at'], zone)} · {g['model']} · {g['prompt'][:60]}"
        words = display.outcome_words(r.outcome if r is not None else "cancelled")
        if words:
            label += f" · {words}"
        with st.expander(label):
            if g.get("reasoning"):      # expanders do not nest: the thinking in a popover
                st.popover("Thinking", icon=":material/psychology:").markdown(
                    display.safe_markdown(g["reasoning"]))
            if g["content"] or g["error"] is None:
                show_answer(st, g["content"])
            if g["error"] is not None:
                show_error(g["error"])
            if r is not None and r.outcome in ("ok", "cancelled") and (r.usage is not None or r.from_cache):
                st.caption(display.result_line(r))
