"""Deterministic, readable completion text built around the topic of the last user message."""

from __future__ import annotations

import hashlib
import json
import random
import re

from core import tokens

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each either few for from further get got had has
    have having he her here hers him his how i if in into is it its itself just let like may me might more most
    much must my no nor not now of off on once only or other our ours out over own please quite rather really
    same shall she should so some such than that the their theirs them then there these they this those through
    thus to too under until up upon us very via was we were what when where which while who whom whose why will
    with within without would yes yet you your yours""".split()
)
# Request verbs and counts say what to do, not what it is about.
INSTRUCTION_WORDS = frozenset(
    """write rewrite draft create generate make give list explain describe tell suggest provide help show summarize
    summarise compose outline brainstorm produce need want share recommend propose come think find
    one two three four five six seven eight nine ten several few some short brief quick""".split()
)

OPENERS = (
    "When it comes to {topic}, the best results start with one clear promise.",
    "Here is a practical way to approach {topic}.",
    "A few simple ideas make {topic} work well in practice.",
    "A good starting point for {topic} is to decide who it is really for.",
    "Most of the value in {topic} comes from getting a handful of basics right.",
    "Let's look at {topic} from the reader's point of view first.",
)
BODY = (
    "Think about what someone expects from {a} before they read a single word.",
    "A short, specific message about {a} usually beats a long and general one.",
    "Lead with the benefit, then explain where {b} fits in.",
    "Each part should have one job, and that job should be obvious at a glance.",
    "Write down the single goal behind {topic} and cut anything that does not serve it.",
    "Concrete examples of {a} are easier to remember than abstract advice.",
    "Keep the tone friendly and direct, and avoid jargon unless the audience expects it.",
    "People rarely act on more than one request at a time, so give them a clear next step.",
    "Timing matters as much as wording, since the same note about {b} lands differently on day one and day ten.",
    "If you are unsure, test two versions and let real behaviour decide.",
    "Small details, like a clear title or a friendly first sentence, shape how people react to {a}.",
    "Plan for the reader who skims, because most of them will.",
    "Measure what happens after the first week, not just the first click.",
    "Link {a} back to {b} so the pieces feel like one story.",
    "Avoid promising more than you can deliver, because trust is hard to rebuild.",
    "A simple checklist keeps {topic} consistent as it grows.",
    "Ask someone who knows little about {a} to read it, and their questions will show you what is missing.",
    "Resist the urge to cover everything at once.",
    "A specific number about {b} is more convincing than a vague claim.",
    "Where possible, show progress so people can see how far they have come.",
    "Good structure does more work than clever phrasing.",
    "Review {topic} every few months, since what worked last year may not work now.",
    "The first draft of anything about {a} is rarely the best one, so leave time to revise.",
    "Make it easy to reply or ask a question, because a real conversation about {b} builds loyalty.",
)
CLOSERS = (
    "In short, keep {topic} focused, specific and easy to act on.",
    "Start small, learn from the results, and improve {a} step by step.",
    "With these basics in place, getting {topic} right becomes much easier.",
    "If you remember only one thing, make it this: clarity beats cleverness.",
)

_CLAUSE = re.compile(r"[.!?\n;:]+")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'’-]*|[0-9]+")
MIN_TOKENS, MAX_TOKENS = 60, 250


def last_user_text(messages: list[dict]) -> str:
    """Text of the last user message (or of the last message when no user spoke)."""
    for message in reversed(messages):
        if message.get("role") == "user" and message.get("content"):
            return message["content"]
    return (messages[-1].get("content") or "") if messages else ""


def _is_filler(word: str) -> bool:
    lower = word.lower()
    return lower in STOPWORDS or lower in INSTRUCTION_WORDS or lower.isdigit()


def _lower_initial(words: list[str]) -> list[str]:
    # A capital only because the sentence starts there would look odd mid-sentence; names keep theirs.
    if words and words[0][:1].isupper() and words[0][1:].islower():
        return [words[0].lower(), *words[1:]]
    return words


def topic_words(text: str, limit: int = 8) -> list[str]:
    """Content words of ``text`` in order of appearance, without stopwords or duplicates."""
    seen, words = set(), []
    for clause in _CLAUSE.split(text):
        for word in _lower_initial(_WORD.findall(clause)):
            key = word.lower()
            if len(word) < 3 or _is_filler(word) or key in seen:
                continue
            seen.add(key)
            words.append(word)
            if len(words) == limit:
                return words
    return words


def topic_phrase(text: str, max_words: int = 8) -> str:
    """A short noun-ish phrase naming the subject, e.g. "onboarding emails for a fitness app"."""
    for clause in _CLAUSE.split(text):
        words = _lower_initial(_WORD.findall(clause))
        while words and _is_filler(words[0]):
            words = words[1:]
        words = words[:max_words]
        while words and words[-1].lower() in STOPWORDS:
            words.pop()
        if words:
            return " ".join(words)
    return "this topic"


def _rng_for(model: str, messages: list[dict], seed, temperature, top_p) -> random.Random:
    key = json.dumps([model, messages, seed, temperature, top_p], sort_keys=True, default=str)
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def generate(model: str, messages: list[dict], *, seed=None, temperature=None, top_p=None) -> str:
    """The full (uncut) reply for this request: same inputs, same text."""
    rng = _rng_for(model, messages, seed, temperature, top_p)
    text = last_user_text(messages)
    topic = topic_phrase(text)
    words = topic_words(text) or [topic]

    def fill(template: str) -> str:
        a, b = (rng.sample(words, 2) if len(words) > 1 else words * 2)
        sentence = template.format(topic=topic, a=a, b=b)
        return sentence[0].upper() + sentence[1:]

    target = rng.randint(MIN_TOKENS, MAX_TOKENS)
    closer = fill(rng.choice(CLOSERS))
    budget = target - tokens.count_text(closer, model)
    body = list(BODY)
    rng.shuffle(body)
    paragraphs, current = [], [fill(rng.choice(OPENERS))]
    paragraph_size = rng.randint(2, 4)
    for template in body:
        if tokens.count_text(" ".join(" ".join(p) for p in [*paragraphs, current]), model) >= budget:
            break
        if len(current) >= paragraph_size:
            paragraphs.append(current)
            current, paragraph_size = [], rng.randint(2, 4)
        current.append(fill(template))
    current.append(closer)
    paragraphs.append(current)
    return "\n\n".join(" ".join(p) for p in paragraphs)


def pieces(text: str) -> list[str]:
    """Stream units: one word each with its leading whitespace, so they join back to ``text``."""
    return re.findall(r"\s*\S+|\s+", text)


_ALTERNATIVES = (" the", " a", " and", " to", " of", ".", ",", " it", " is", " for", " with", " on", " in",
                 " that", " as", " by", " this", " be", " or", " at")


def logprob(piece: str, top: int) -> dict:
    """A log probability for a piece of text (the same piece, the same value) with ``top``
    alternatives, in OpenAI's shape."""
    value = -int(hashlib.sha256(piece.encode()).hexdigest()[:4], 16) / 65536 * 2

    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": round(lp, 6), "bytes": list(token.encode())}
    alternatives = [entry(piece, value)] + [entry(t, value - 1 - i) for i, t in enumerate(
        t for t in _ALTERNATIVES if t != piece)]
    return {**entry(piece, value), "top_logprobs": alternatives[:top]}


def truncate(text: str, max_tokens: int | None, model: str) -> tuple[str, bool]:
    """The longest word-boundary prefix within ``max_tokens``; second item tells whether it was cut."""
    if max_tokens is None or tokens.count_text(text, model) <= max_tokens:
        return text, False
    kept = ""
    for piece in pieces(text):
        if tokens.count_text(kept + piece, model) > max_tokens:
            break
        kept += piece
    if not kept:
        # Not even one word fits: keep its first tokens, as a real model would emit them.
        enc = tokens.encoding_for(model)
        kept = enc.decode(enc.encode(text.lstrip())[:max_tokens])
        if tokens.count_text(kept, model) > max_tokens:
            kept = ""
    return kept, True


_THOUGHTS = ("Let me work out what is being asked. ", "The reader wants something short and clear. ",
             "I should keep the tone friendly. ", "A concrete detail will make it land. ",
             "Check the length against the request. ")


def thinking(count: int) -> list[str]:
    """``count`` pieces of a reasoning model's thinking, streamed before its answer."""
    return [_THOUGHTS[i % len(_THOUGHTS)] for i in range(count)]
