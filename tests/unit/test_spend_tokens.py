"""Token estimates: never 0 for text, close to o200k_base, OpenAI's chat framing, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mitmroute.spend import tokens
from mitmroute.spend.tokens import (
    estimate_prompt_tokens,
    estimate_text_tokens,
    heuristic_text_tokens,
)

# Reference counts from tiktoken's o200k_base (gpt-4o, gpt-4.1, o-series, gpt-5).
REFERENCE = {
    "The quick brown fox jumps over the lazy dog. Meanwhile, the committee reconvened to "
    "discuss the quarterly budget, which had grown unexpectedly due to infrastructure "
    "investments and several unplanned hiring decisions across the engineering organization.": 42,
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n": 51,
    '{"id": 12345, "name": "widget", "price": 19.99, "tags": ["blue", "small"], '
    '"in_stock": true}': 36,
    "人人生而自由\uff0c在尊严和权利上一律平等。"
    "他们赋有理性和良心\uff0c并应以兄弟关系的精神相对待。": 35,
}
PROSE = next(iter(REFERENCE))


@pytest.fixture
def heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the heuristic even on a machine whose tiktoken cache holds the BPE files."""
    monkeypatch.setattr(tokens, "_encoders", {"o200k_base": None, "cl100k_base": None})


@pytest.mark.parametrize("text", [" ", "\n", "!", "a", "7", "é", "中", "🙂", "\t\t", "x" * 500])
def test_never_zero_for_non_empty_text(text: str) -> None:
    assert heuristic_text_tokens(text) >= 1
    assert estimate_text_tokens(text, "gpt-4o") >= 1
    assert estimate_text_tokens(text, "claude-sonnet-4-5") >= 1


def test_empty_text_is_zero() -> None:
    assert estimate_text_tokens("", "gpt-4o") == 0


@pytest.mark.parametrize(("text", "expected"), list(REFERENCE.items()))
def test_heuristic_is_close_to_o200k(text: str, expected: int) -> None:
    assert abs(heuristic_text_tokens(text) - expected) <= max(2, expected * 0.15)


def test_long_text_scales(heuristic: None) -> None:
    one = estimate_text_tokens(PROSE, "gpt-4o")
    assert estimate_text_tokens(PROSE * 100, "gpt-4o") == pytest.approx(one * 100, rel=0.05)


def test_chat_framing(heuristic: None) -> None:
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?", "name": "bob"},
    ]
    parts = ["system", "You are a helpful assistant.", "user", "What is the capital of France?"]
    text = sum(heuristic_text_tokens(t) for t in parts)
    expected = text + 2 * 3 + (1 + heuristic_text_tokens("bob")) + 3
    assert estimate_prompt_tokens({"model": "gpt-4o", "messages": msgs}, "gpt-4o") == expected


def test_parts_images_tools_and_tool_calls(heuristic: None) -> None:
    base = {"messages": [{"role": "user", "content": [{"type": "text", "text": "describe"}]}]}
    plain = estimate_prompt_tokens(base, "gpt-4o")
    low = {"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}}
    high = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    with_images = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"}, low, high]}]}  # fmt: skip
    assert estimate_prompt_tokens(with_images, "gpt-4o") == plain + 85 + 765
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert estimate_prompt_tokens({**base, "tools": tools}, "gpt-4o") > plain + 5
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}  # fmt: skip
    two = {"messages": [*base["messages"], call]}
    assert estimate_prompt_tokens(two, "gpt-4o") > plain + 3 + 5


def test_prompt_and_input_shapes(heuristic: None) -> None:
    one = heuristic_text_tokens("hello world")
    assert estimate_prompt_tokens({"prompt": "hello world"}, "gpt-3.5-turbo-instruct") == one
    assert estimate_prompt_tokens({"prompt": ["hello world"] * 3}, "x") == 3 * one
    assert estimate_prompt_tokens({"input": "hello world"}, "text-embedding-3-small") == one
    assert estimate_prompt_tokens({"input": ["hello world", "hello world"]}, "x") == 2 * one
    assert estimate_prompt_tokens({"input": [1, 2, 3, 4]}, "text-embedding-3-small") == 4
    assert estimate_prompt_tokens({"input": [[1, 2], [3]]}, "text-embedding-3-small") == 3
    responses = {"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]}]}  # fmt: skip
    assert estimate_prompt_tokens(responses, "gpt-4.1") == (
        heuristic_text_tokens("be brief") + 3 + heuristic_text_tokens("user") + one
    )
    assert estimate_prompt_tokens({}, "gpt-4o") == 0


def test_no_download_is_ever_attempted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tiktoken.load

    def no_network(*args: object, **kw: object) -> bytes:
        raise AssertionError("tiktoken tried to download an encoding")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: no BPE files here
    monkeypatch.setattr(tokens, "_encoders", {})
    assert estimate_text_tokens(PROSE, "gpt-4o") == heuristic_text_tokens(PROSE)
    assert not tokens.is_exact("gpt-4o")
