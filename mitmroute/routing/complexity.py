"""The complexity classifier: which tier (SIMPLE, MEDIUM, COMPLEX, REASONING) a chat request
needs, decided in-process from the request alone, deterministically, in microseconds.

It reads the engine's chat body (every inbound dialect is translated to it first) and scores
dimensions between 0 and 1:

==================== ========================================================================
``tokenCount``       length of the ask (the last user turn), log-scaled between the
                     ``token_thresholds`` ``simple`` and ``complex``
``codePresence``     fenced code, lines that look like code, code vocabulary
``reasoningMarkers`` proofs, derivations, "step by step", puzzles: work that needs thinking
``technicalTerms``   analysis and engineering cues: design, trade-offs, concurrency, root cause
``multiStepPatterns`` numbered steps, "first ... then", several requirements
``questionComplexity`` several questions in one ask
``toolUse``          tools offered, tool results in the conversation (an agent at work)
``conversationDepth`` user turns so far and the size of the whole context
``simpleIndicators`` greetings, thanks, "what is", "translate", "in one sentence" (subtracted)
==================== ========================================================================

The score is the weighted sum (``simpleIndicators`` subtracted); ``tier_boundaries`` cut it into
tiers. REASONING also needs a reasoning marker, so a long technical ask is COMPLEX, not
REASONING. ``keyword_tier_rules`` force a tier when one of their keywords occurs, and an
``escalation_keywords`` phrase (case-sensitive) raises the result one tier.

Cost: everything but the ask's length is read from a window of it (its first and last
``max_scan_chars / 2`` characters, default 8000 in all), so a 1 MB prompt costs what an 8 KB one
does. ``scripts/bench_complexity.py`` measures it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

TIERS = ("SIMPLE", "MEDIUM", "COMPLEX", "REASONING")
SIMPLE, MEDIUM, COMPLEX, REASONING = range(4)

DIMENSIONS = (
    "tokenCount",
    "codePresence",
    "reasoningMarkers",
    "technicalTerms",
    "multiStepPatterns",
    "questionComplexity",
    "toolUse",
    "conversationDepth",
    "simpleIndicators",
)
"""LiteLLM's dimension names, and mitmroute's `toolUse` and `conversationDepth`."""

DEFAULT_WEIGHTS: Mapping[str, float] = {
    "tokenCount": 0.22,
    "codePresence": 0.20,
    "reasoningMarkers": 0.36,
    "technicalTerms": 0.26,
    "multiStepPatterns": 0.12,
    "questionComplexity": 0.04,
    "toolUse": 0.08,
    "conversationDepth": 0.06,
    "simpleIndicators": 0.25,
}
DEFAULT_BOUNDARIES = {"simple_medium": 0.08, "medium_complex": 0.20, "complex_reasoning": 0.50}
DEFAULT_TOKEN_THRESHOLDS = {"simple": 8, "complex": 120}
DEFAULT_MAX_SCAN_CHARS = 8000


def keyword_list(text: str, strip: bool = True) -> tuple[str, ...]:
    """Comma-separated keywords (a config may also give a YAML list)."""
    parts = (" ".join(p.split()) for p in text.split(",")) if strip else text.split(",")
    return tuple(k for k in parts if k)


# Keyword lists, written for mitmroute. Single words match whole words of the lower-cased ask
# (hyphens and apostrophes belong to a word); entries with a space match as substrings.

DEFAULT_CODE_KEYWORDS = keyword_list(
    """
    code, function, method, class, def, lambda, return, import, module, compile, compiler,
    compiles, runtime, variable, variables, loop, recursion, recursive, regex, regexp, sql,
    query, python, javascript, typescript, java, rust, golang, c++, c#, kotlin, swift,
    haskell, bash, shell, script, dockerfile, makefile, api, endpoint, json, yaml, html, css,
    react, django, flask, numpy, pandas, bug, bugs, debug, debugging, traceback, exception,
    segfault, stacktrace, null pointer, stack trace, unit test, unit tests, pytest, repo,
    repository, commit, git, refactor, refactoring, implement, implementation, async, await,
    thread, threads, mutex, struct, pointer, pointers, array, hashmap, dict, iterator,
    generator, decorator, interface, dependency, library, framework, kubernetes, terraform
    """
)
DEFAULT_REASONING_KEYWORDS = keyword_list(
    """
    prove, proof, proofs, derive, derivation, rigorous, rigorously, formally, induction,
    by contradiction, counterexample, step by step, step-by-step, show that, show your work,
    think carefully, reason through, reason backward, work out, puzzle, riddle, how many ways,
    count the number, probability that, the probability, expected value, expected number,
    optimal strategy, optimal play, game theory, invariant, invariants, asymptotic, big-o,
    time complexity, np-hard, np-complete, closed form, closed-form, recurrence,
    differential equation, lagrange, infinitely many, deduce, justify, how fast
    """
)
DEFAULT_TECHNICAL_KEYWORDS = keyword_list(
    """
    architecture, architect, design, distributed, scalable, scalability, microservice,
    microservices, concurrency, concurrent, race condition, deadlock, consistency, consensus,
    replication, partition, sharding, shard, latency, throughput, bottleneck, performance,
    profiling, memory leak, leak, leaks, optimize, optimise, optimization, tradeoff,
    tradeoffs, trade-off, trade-offs, analyze, analyse, analysis, evaluate, evaluation,
    assess, critique, compare, comparison, implications, strategy, strategies, root cause,
    diagnose, investigate, migration, migrate, security, vulnerability, vulnerabilities,
    threat model, attack, attacker, encryption, cryptographic, protocol, algorithm,
    algorithms, data structure, edge cases, failure modes, fault tolerance, idempotent,
    idempotency, exactly-once, transaction, transactions, isolation level, schema, index,
    cache invalidation, load balancing, rollout, regression, statistical, hypothesis, causal,
    confounding, in depth, in-depth, comprehensive, roadmap, requirements, specification,
    legal, liability, differential diagnosis, interaction, enforceable, copyright, gdpr,
    unit economics, viable, propose, justify, recommend one, how would you, what would you,
    how should we, should we, explain why, walk me through, walk through, figure out, risks,
    options, pros and cons, second-order, incident, forensics, mechanism, intermittently,
    flaky, only in production, oomkilled, p99
    """
)
DEFAULT_SIMPLE_KEYWORDS = keyword_list(
    """
    hi, hello, hey, thanks, thank you, thx, good morning, good night, bye, lol, ok, okay,
    what is, what's, what are, what does, who is, who was, who wrote, who invented, when is,
    when was, when did, where is, which, how many, how much, how do i, how do you, define,
    definition of, meaning of, synonym, synonyms, antonym, opposite of, translate,
    translation, spell, spelling, capital of, convert, one word, one sentence, one line,
    in one line, two sentences, three sentences, briefly, brief, simple terms, simply,
    in simple words, quick question, short answer, yes or no, true or false, tl;dr, tldr,
    summarize, summarise, summary, rephrase, reword, rewrite, fix the grammar, grammar,
    typos, capitalize, emoji, joke, haiku, limerick, rhyme, poem, fun fact, recommend a,
    suggest a, suggest three, name three, give me a, recipe
    """
)
TRANSFORM_CUES = keyword_list(
    """
    summarize, summarise, summary, tl;dr, tldr, key points, headline, translate, translation,
    rephrase, reword, rewrite, paraphrase, proofread, fix the grammar, fix grammar, typos,
    shorten, turn this into, convert this list, format this, extract, pull the, put these,
    sort these, count the words, make this email, make this tweet, make this sentence
    """
)
"""An ask that transforms text it carries (summarize, translate, rewrite, ...) is scored on
its instruction (its first line) alone: the pasted text's vocabulary is not the task."""
CONSTRAINT_CUES = keyword_list(
    """
    without, must, must not, never, at most, at least, exactly, while keeping, even though,
    although, even if, given that, subject to, constraints, constraint, within, under load,
    but, so that, respecting, in the next, across all
    """
)
"""Requirements stacked on a task: counted with numbered steps as `multiStepPatterns`."""

_WORD = re.compile(r"[a-z0-9_][a-z0-9_+#'-]*")
_SPACES = str.maketrans({c: " " for c in '!"$%&()*,./:;<=>?@[\\]^`{|}~\t\r\n'})
"""What separates words (`+`, `#`, `-`, `'` and `_` belong to them: c++, c#, trade-off)."""
_CODE_STARTS = tuple(
    keyword_list(
        "def ,class ,import ,#include,public ,private ,func ,fn ,let ,const ,var ,return ,"
        "if (,for (,while (,select ,insert into ,create table ,@,},</,$ ",
        strip=False,
    )
)
_CODE_ENDS = (";", "{", "):", "=>")
_BULLETS = ("- ", "* ", "• ")
_MAX_LINES = 400
_REMINDER_OPEN, _REMINDER_CLOSE = "<system-reminder>", "</system-reminder>"


@dataclass(frozen=True, slots=True)
class Keywords:
    """A keyword list split for fast matching: whole words (a set) and phrases (substrings,
    looked for only when their first word occurs)."""

    words: frozenset[str] = frozenset()
    phrases: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> Keywords:
        words, phrases = set(), []
        for entry in entries:
            e = " ".join(entry.lower().split())
            if not e:
                continue
            if " " in e or not _WORD.fullmatch(e):
                phrases.append(e)
            else:
                words.add(e)
        unique = dict.fromkeys(phrases)
        return cls(
            frozenset(words), tuple((split_words(p)[0], p) for p in unique if split_words(p))
        )

    def hits(self, words: set[str], text: str) -> list[str]:
        found = sorted(self.words.intersection(words))
        found += [p for first, p in self.phrases if first in words and p in text]
        return found


@dataclass(frozen=True, slots=True)
class TierRule:
    """`keyword_tier_rules[]`: any of `keywords` (case-insensitive substring) forces `tier`."""

    keywords: tuple[str, ...]
    tier: int


@dataclass(frozen=True, slots=True)
class ClassifierSettings:
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    boundaries: tuple[float, float, float] = (
        DEFAULT_BOUNDARIES["simple_medium"],
        DEFAULT_BOUNDARIES["medium_complex"],
        DEFAULT_BOUNDARIES["complex_reasoning"],
    )
    token_thresholds: tuple[int, int] = (
        DEFAULT_TOKEN_THRESHOLDS["simple"],
        DEFAULT_TOKEN_THRESHOLDS["complex"],
    )
    code: Keywords = field(default_factory=lambda: Keywords.of(DEFAULT_CODE_KEYWORDS))
    reasoning: Keywords = field(default_factory=lambda: Keywords.of(DEFAULT_REASONING_KEYWORDS))
    technical: Keywords = field(default_factory=lambda: Keywords.of(DEFAULT_TECHNICAL_KEYWORDS))
    simple: Keywords = field(default_factory=lambda: Keywords.of(DEFAULT_SIMPLE_KEYWORDS))
    rules: tuple[TierRule, ...] = ()
    escalation: tuple[str, ...] = ()
    max_scan_chars: int = DEFAULT_MAX_SCAN_CHARS


@dataclass(frozen=True, slots=True)
class Classification:
    """The classifier's verdict: a tier index, the score, and the dimensions that fired."""

    tier: int
    score: float
    signals: tuple[str, ...]
    rule: bool = False
    """A `keyword_tier_rules` entry decided, not the score."""

    @property
    def name(self) -> str:
        return TIERS[self.tier]


@dataclass(slots=True)
class Features:
    """What the classifier reads of a request (exposed for tests and the benchmark)."""

    ask: str = ""
    """The last user turn without agents' reminders; of a long one, its first and last
    `max_scan_chars / 2` characters."""
    ask_tokens: int = 0
    context_tokens: int = 0
    user_turns: int = 0
    tool_messages: int = 0
    has_tools: bool = False
    fences: int = 0


def _text(content: Any) -> str:
    """The text of a chat message's content (a string, or text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return ""


def _size(content: Any) -> int:
    """Characters of a message's content, without building its text."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                total += len(text) if isinstance(text, str) else 0
        return total
    return 0


def split_words(lowered: str) -> list[str]:
    """The words of a lower-cased text."""
    return lowered.translate(_SPACES).split()


def _lines(window: str) -> tuple[int, int]:
    """(lines that look like code, numbered or bulleted lines) of a lower-cased window."""
    code = listed = 0
    for n, line in enumerate(window.split("\n")):
        if n >= _MAX_LINES:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith(_CODE_STARTS) or text.endswith(_CODE_ENDS):
            code += 1
        if text.startswith(_BULLETS) or (
            text[0].isdigit() and (text[1:3] in (". ", ") ") or text[2:4] in (". ", ") "))
        ):
            listed += 1
    return code, listed


def strip_reminders(text: str) -> str:
    """The text without the `<system-reminder>` blocks coding agents inject into user turns."""
    if _REMINDER_OPEN not in text:
        return text
    out, start = [], 0
    while (i := text.find(_REMINDER_OPEN, start)) >= 0:
        out.append(text[start:i])
        end = text.find(_REMINDER_CLOSE, i)
        if end < 0:
            start = len(text)
            break
        start = end + len(_REMINDER_CLOSE)
    out.append(text[start:])
    return "".join(out).strip()


def scan_window(text: str, limit: int = DEFAULT_MAX_SCAN_CHARS) -> tuple[str, int]:
    """(the text to scan, the length of the whole text without reminders): the text itself
    when short, else its head and tail (reminders cut from each), so no pass over a long
    prompt but `len()` costs more than one over `limit` characters."""
    if len(text) <= limit:
        stripped = strip_reminders(text)
        return stripped, len(stripped)
    half = limit // 2
    head, tail = text[:half], text[-half:]
    middle = len(text) - 2 * half
    close, opening = tail.find(_REMINDER_CLOSE), tail.find(_REMINDER_OPEN)
    if close >= 0 and (opening < 0 or close < opening):  # a reminder cut by the tail's start
        tail = tail[close + len(_REMINDER_CLOSE) :]
        if head.rfind(_REMINDER_OPEN) > head.rfind(_REMINDER_CLOSE):
            middle = 0  # ... that the head opened: all between is reminder
    head, tail = strip_reminders(head), strip_reminders(tail)
    return f"{head}\n{tail}", len(head) + middle + len(tail)


def features(body: Mapping[str, Any], max_scan_chars: int = DEFAULT_MAX_SCAN_CHARS) -> Features:
    """Read a chat body (or a legacy completions body's `prompt`)."""
    f = Features()
    messages = body.get("messages")
    context_chars = 0
    if isinstance(messages, list):
        ask_message = None
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            content = message.get("content")
            context_chars += _size(content)
            if role == "user":
                f.user_turns += 1
                ask_message = content
            elif role in ("tool", "function") or (
                role == "assistant" and message.get("tool_calls")
            ):
                f.tool_messages += 1
        ask = _text(ask_message)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = "\n".join(p for p in prompt if isinstance(p, str))
        ask = prompt if isinstance(prompt, str) else ""
        context_chars = len(ask)
        f.user_turns = 1
    tools = body.get("tools") or body.get("functions")
    f.has_tools = isinstance(tools, list) and len(tools) > 0
    f.ask, chars = scan_window(ask, max_scan_chars)
    f.ask_tokens = (chars + 3) // 4
    f.context_tokens = (context_chars + 3) // 4
    f.fences = f.ask.count("```") // 2
    return f


def _log_scale(value: float, low: float, high: float) -> float:
    if value <= low:
        return 0.0
    if value >= high:
        return 1.0
    return math.log(value / low) / math.log(high / low)


class ComplexityClassifier:
    """Scores a chat body into a tier; one instance per router, shared by every request."""

    def __init__(self, settings: ClassifierSettings | None = None) -> None:
        self.settings = s = settings or ClassifierSettings()
        self._weights = {d: float(s.weights.get(d, 0.0)) for d in DIMENSIONS}

    def classify(self, body: Mapping[str, Any]) -> Classification:
        return self.classify_features(features(body, self.settings.max_scan_chars))

    def classify_features(self, f: Features) -> Classification:
        s = self.settings
        ask = f.ask
        lowered = ask.lower()
        signals: list[str] = []

        # deterministic overrides first: the highest matching tier wins
        forced = max(
            (r.tier for r in s.rules if any(k in lowered for k in r.keywords)), default=None
        )

        # a transformation of text the ask carries is scored on its instruction line alone
        tokens, fences = f.ask_tokens, f.fences
        instruction = lowered.lstrip().split("\n", 1)[0][:300]
        if len(instruction) < len(lowered.strip()) and _TRANSFORM.hits(
            set(split_words(instruction)), instruction
        ):
            lowered = instruction
            tokens, fences = (len(instruction) + 3) // 4, 0
            signals.append("transform")
        words = set(split_words(lowered))
        code_lines, listed = _lines(lowered) if "\n" in lowered else (0, 0)

        dims: dict[str, float] = {}
        simple_low, complex_high = s.token_thresholds
        dims["tokenCount"] = _log_scale(tokens, simple_low, complex_high)

        if fences:
            code = 1.0
        else:
            code_hits = len(s.code.hits(words, lowered))
            code = 0.8 if code_lines >= 3 else (0.0, 0.35, 0.6, 0.8)[min(code_hits, 3)]
        dims["codePresence"] = code

        reasoning_hits = len(s.reasoning.hits(words, lowered))
        dims["reasoningMarkers"] = (0.0, 0.9, 1.0)[min(reasoning_hits, 2)]
        technical_hits = len(s.technical.hits(words, lowered))
        dims["technicalTerms"] = (0.0, 0.45, 0.75, 1.0)[min(technical_hits, 3)]

        steps = listed + len(_STEPS.hits(words, lowered))
        steps += len(_CONSTRAINTS.hits(words, lowered))
        dims["multiStepPatterns"] = (0.0, 0.3, 0.6, 1.0)[min(steps, 3)]
        questions = lowered.count("?")
        dims["questionComplexity"] = (0.0, 0.0, 0.5, 1.0)[min(questions, 3)]
        dims["toolUse"] = (0.5 if f.has_tools else 0.0) + (0.5 if f.tool_messages else 0.0)
        turns = min(1.0, max(0, f.user_turns - 1) / 6)
        dims["conversationDepth"] = max(turns, _log_scale(f.context_tokens, 2000, 64000))
        # a simple cue says little in a long ask: it counts by the ask's shortness
        simple = bool(s.simple.hits(words, lowered))
        dims["simpleIndicators"] = (1.0 - dims["tokenCount"]) ** 2 if simple else 0.0

        w = self._weights
        score = sum(w[d] * v for d, v in dims.items() if d != "simpleIndicators")
        score = round(score - w["simpleIndicators"] * dims["simpleIndicators"], 4)
        signals += [d for d, v in dims.items() if v > 0 and w[d]]

        rule = forced is not None
        if forced is not None:
            tier = forced
        else:
            b1, b2, b3 = s.boundaries
            if score >= b3 and reasoning_hits:
                tier = REASONING
            elif score >= b2:
                tier = REASONING if reasoning_hits >= 2 else COMPLEX
            elif score >= b1:
                tier = MEDIUM
            else:
                tier = SIMPLE
        if s.escalation and any(k in ask for k in s.escalation):
            tier = min(tier + 1, REASONING)
            signals.append("escalation")
        return Classification(tier, score, tuple(signals), rule)


_TRANSFORM = Keywords.of(TRANSFORM_CUES)
_STEPS = Keywords.of(("first", "then", "after that", "finally", "secondly", "lastly"))
_CONSTRAINTS = Keywords.of(CONSTRAINT_CUES)
