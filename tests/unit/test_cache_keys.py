"""Cache key normalization: what shares an entry and what does not."""

from __future__ import annotations

import copy

import pytest

from mitmroute.cache.keys import IGNORED_PARAMS, cache_key, normalize, scope_id

BASE = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Say hi"}],
    "temperature": 0.2,
}


def key(body: dict, *, endpoint: str = "chat/completions", group: str = "gpt-4o", **kw) -> str:
    kw.setdefault("namespace", "ns")
    kw.setdefault("scope_id", None)
    return cache_key(endpoint, group, body, **kw)


def test_format_is_namespace_and_sha256_hex() -> None:
    k = key(BASE, namespace="mitmroute:team-a")
    prefix, _, digest = k.rpartition(":")
    assert prefix == "mitmroute:team-a"
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_key_order_is_irrelevant_at_every_level() -> None:
    schema_a = {"type": "json_schema", "json_schema": {"name": "a", "strict": True}}
    schema_b = {"json_schema": {"strict": True, "name": "a"}, "type": "json_schema"}
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": schema_a}
    b = {"response_format": schema_b, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert key(a) == key(b)


@pytest.mark.parametrize(
    "extra",
    [
        {"user": "alice"},
        {"metadata": {"trace": "123"}},
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"cache": {"no-store": True}},
        {"store": True},
        {"service_tier": "flex"},
        {"safety_identifier": "u-1"},
        {"prompt_cache_key": "pk"},
        {"temperature": 0.2},  # the same value again
        {"n": 1},
        {"seed": None},
    ],
)
def test_parameters_that_do_not_change_the_answer_share_the_key(extra: dict) -> None:
    assert key({**BASE, **extra}) == key(BASE)


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.3},
        {"top_p": 0.5},
        {"max_tokens": 10},
        {"max_completion_tokens": 10},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "required"},
        {"parallel_tool_calls": False},
        {"response_format": {"type": "json_object"}},
        {"seed": 7},
        {"stop": ["\n"]},
        {"n": 2},
        {"logprobs": True},
        {"top_logprobs": 2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}},
        {"reasoning_effort": "low"},
        {"modalities": ["text", "audio"]},
        {"some_future_parameter": 1},
    ],
)
def test_parameters_that_change_the_answer_change_the_key(extra: dict) -> None:
    assert key({**BASE, **extra}) != key(BASE)


def test_messages_change_the_key() -> None:
    other = copy.deepcopy(BASE)
    other["messages"][0]["content"] = "Say bye"
    assert key(other) != key(BASE)


def test_model_group_not_raw_model() -> None:
    assert key({**BASE, "model": "azure-gpt-4o"}) == key(BASE)
    assert key(BASE, group="gpt-4o-mini") != key(BASE)


def test_endpoint_scope_and_namespace_separate_entries() -> None:
    assert key(BASE, endpoint="completions") != key(BASE)
    assert key(BASE, scope_id="key:abc") != key(BASE)
    assert key(BASE, scope_id="key:abc") != key(BASE, scope_id="key:def")
    assert key(BASE, namespace="a").split(":")[-1] == key(BASE, namespace="b").split(":")[-1]


def test_numeric_and_default_normalization() -> None:
    assert key({**BASE, "temperature": 1}) == key({**BASE, "temperature": 1.0})
    assert key({**BASE, "max_tokens": 5}) == key({**BASE, "max_completion_tokens": 5})
    assert key({**BASE, "max_tokens": 5, "max_completion_tokens": 5}) == key(
        {**BASE, "max_tokens": 5}
    )
    assert key({**BASE, "max_tokens": 5, "max_completion_tokens": 6}) != key(
        {**BASE, "max_completion_tokens": 6}
    )


def test_embeddings_and_completions_parameters() -> None:
    emb = {"model": "e", "input": ["a", "b"]}
    assert key(emb, endpoint="embeddings") == key(
        {**emb, "encoding_format": "float", "user": "u"}, endpoint="embeddings"
    )
    for extra in ({"encoding_format": "base64"}, {"dimensions": 256}, {"input": ["a"]}):
        assert key({**emb, **extra}, endpoint="embeddings") != key(emb, endpoint="embeddings")
    comp = {"model": "c", "prompt": "Once upon", "max_tokens": 5}
    assert key({**comp, "prompt": "Twice"}, endpoint="completions") != key(
        comp, endpoint="completions"
    )
    assert key({**comp, "echo": True}, endpoint="completions") != key(comp, endpoint="completions")


def test_normalize_does_not_touch_the_body() -> None:
    body = {**BASE, "user": "u", "max_tokens": 3}
    before = copy.deepcopy(body)
    normalize("chat/completions", body)
    assert body == before
    assert "stream" in IGNORED_PARAMS and "temperature" not in IGNORED_PARAMS


def test_scope_id() -> None:
    assert scope_id("global", key_hash="k", team="t") is None
    assert scope_id("key", key_hash="k", team="t") == "key:k"
    assert scope_id("team", key_hash="k", team="t") == "team:t"
    assert scope_id("team", key_hash="k", team=None) == "key:k"
    assert scope_id("key") == "key:-"
