"""The complexity classifier: what tier a request gets, that it is deterministic and fast, and
how it does on the labeled prompt set (tests/data/complexity_prompts.yaml)."""

from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path

import pytest
import yaml

from mitmroute.routing.complexity import (
    COMPLEX,
    MEDIUM,
    REASONING,
    SIMPLE,
    ClassifierSettings,
    ComplexityClassifier,
    TierRule,
    features,
    strip_reminders,
)

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "complexity_prompts.yaml"
CLASSIFIER = ComplexityClassifier()


def ask(text: str, **body) -> int:
    return CLASSIFIER.classify({"messages": [{"role": "user", "content": text}], **body}).tier


def entry_body(entry: dict) -> dict:
    body = {"messages": entry.get("messages") or [{"role": "user", "content": entry["prompt"]}]}
    if entry.get("tools"):
        body["tools"] = [{"type": "function", "function": {"name": "tool", "parameters": {}}}]
    return body


def test_greetings_and_lookups_are_simple():
    assert ask("hi!") == SIMPLE
    assert ask("What is the capital of France?") == SIMPLE
    assert ask("thanks, that helped") == SIMPLE


def test_a_proof_is_reasoning():
    assert ask("Prove that there are infinitely many primes, step by step.") == REASONING


def test_a_design_question_with_trade_offs_is_complex():
    tier = ask(
        "Design a distributed rate limiter for an API served from three regions; discuss "
        "consistency, failure modes and the trade-offs of each option."
    )
    assert tier == COMPLEX


def test_small_code_is_cheap_debugging_code_is_not():
    assert ask("Write a Python function that reverses a string.") <= MEDIUM
    traceback = (
        "This fails only in production, why?\n```\nTraceback (most recent call last):\n"
        '  File "app.py", line 3, in <module>\n    main()\nRuntimeError: boom\n```\n'
        "Find the root cause and propose a fix that keeps the API backwards compatible."
    )
    assert ask(traceback) >= COMPLEX


def test_a_translation_is_scored_on_its_instruction_not_the_text_it_carries():
    paragraph = (
        "The distributed architecture relies on consensus and replication; we evaluate the "
        "trade-offs of sharding, the latency of cross-region transactions and the security of "
        "the encryption protocol under concurrency. " * 5
    )
    assert ask(f"Translate into German:\n\n{paragraph}") <= MEDIUM
    assert ask(paragraph) >= COMPLEX


def test_agents_reminders_are_not_the_ask():
    text = "<system-reminder>Design a distributed system, prove it</system-reminder>\nhi"
    assert strip_reminders(text) == "hi"
    assert ask(text) == SIMPLE


def test_the_ask_is_the_last_user_turn_even_after_a_tool_result():
    body = {
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{'temp': 18}"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
    }
    f = features(body)
    assert f.ask == "What's the weather in Paris?"
    assert f.tool_messages == 2 and f.has_tools
    verdict = CLASSIFIER.classify(body)
    assert "toolUse" in verdict.signals and verdict.tier <= MEDIUM


def test_a_legacy_completions_prompt_is_classified_too():
    verdict = CLASSIFIER.classify({"prompt": "Prove that the square root of 2 is irrational."})
    assert verdict.tier >= COMPLEX


def test_keyword_tier_rules_force_a_tier_and_escalation_raises_one():
    settings = ClassifierSettings(rules=(TierRule(("kubernetes",), COMPLEX),), escalation=("!!",))
    classifier = ComplexityClassifier(settings)
    forced = classifier.classify({"messages": [{"role": "user", "content": "hi kubernetes"}]})
    assert forced.tier == COMPLEX and forced.rule
    raised = classifier.classify({"messages": [{"role": "user", "content": "hi !!"}]})
    assert raised.tier == MEDIUM and "escalation" in raised.signals


def test_the_same_body_always_gets_the_same_verdict():
    body = {"messages": [{"role": "user", "content": "Compare Raft and Paxos in depth."}]}
    assert len({CLASSIFIER.classify(body) for _ in range(20)}) == 1


def test_odd_bodies_are_classified_not_refused():
    for body in (
        {"messages": []},
        {"messages": [{"role": "system", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}, "x", 3]}]},
        {"messages": [{"role": "user", "content": None}]},
        {"prompt": ["a", 1, "b"]},
        {},
    ):
        assert CLASSIFIER.classify(body).tier in (SIMPLE, MEDIUM, COMPLEX, REASONING)


def _labeled() -> list[tuple[str, dict]]:
    entries = yaml.safe_load(PROMPTS.read_text())
    return [("dev" if zlib.crc32(e["id"].encode()) % 2 == 0 else "test", e) for e in entries]


def test_the_prompt_set_has_a_few_hundred_labeled_prompts():
    entries = [e for _, e in _labeled()]
    assert len(entries) >= 300
    assert {e["label"] for e in entries} == {"easy", "hard"}
    assert len({e["id"] for e in entries}) == len(entries)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_accuracy_on_the_labeled_set_easy_vs_hard(split):
    """Easy = SIMPLE/MEDIUM (the cheap tiers in the seed's config), hard = COMPLEX/REASONING.
    The defaults were tuned on `dev` only; `test` is the held-out half."""
    rows = [e for s, e in _labeled() if s == split]
    right = sum(
        (CLASSIFIER.classify(entry_body(e)).tier >= COMPLEX) == (e["label"] == "hard") for e in rows
    )
    assert right / len(rows) >= 0.92


def test_classifying_a_long_prompt_takes_well_under_a_millisecond():
    big = ("def handler(event):\n    return process(event)  # see the design notes\n" * 4000) + (
        "\nWhy does this leak memory under load? Explain the root cause."
    )
    agent = {
        "messages": [{"role": "system", "content": "You are a coding agent. " * 2000}]
        + [
            {"role": "user" if i % 2 else "assistant", "content": f"turn {i} " * 50}
            for i in range(300)
        ],
        "tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(12)],
    }
    for body in ({"messages": [{"role": "user", "content": big}]}, agent):
        CLASSIFIER.classify(body)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            CLASSIFIER.classify(body)
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 0.001, f"{len(str(body))} chars"
