"""Per-request cache controls: body `cache` object, Cache-Control header, mode, call types."""

from __future__ import annotations

from dataclasses import replace

import pytest
from mitmproxy.http import Headers

from mitmroute.cache.controls import parse_controls
from mitmroute.config import CacheSettings
from mitmroute.errors import ProxyError

ON = CacheSettings(enabled=True, ttl=300)


def chat(cache: object = None, **extra: object) -> dict:
    body: dict = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    if cache is not None:
        body["cache"] = cache
    return body


def parse(body: dict, headers: dict | None = None, settings: CacheSettings = ON, **kw):
    return parse_controls(body, headers or {}, settings, **kw)


def test_defaults_read_and_write_with_settings_ttl() -> None:
    c = parse(chat())
    assert (c.read, c.write, c.ttl, c.max_age, c.namespace) == (True, True, 300, None, "mitmroute")
    assert c.active


def test_cache_object_is_removed_from_the_body() -> None:
    body = chat({"no-cache": True})
    parse(body)
    assert "cache" not in body
    body = chat({"no-cache": True})
    parse(body, settings=CacheSettings(enabled=False))  # even with caching off
    assert "cache" not in body


def test_no_cache_and_no_store() -> None:
    c = parse(chat({"no-cache": True}))
    assert (c.read, c.write) == (False, True)
    c = parse(chat({"no-store": True}))
    assert (c.read, c.write) == (True, False)
    c = parse(chat({"no_cache": True, "no_store": True}))  # underscore spelling
    assert not c.active


def test_ttl_s_maxage_namespace() -> None:
    c = parse(chat({"ttl": 5, "s-maxage": 60, "namespace": "team-a"}))
    assert (c.ttl, c.max_age, c.namespace) == (5.0, 60.0, "mitmroute:team-a")
    c = parse(chat({"s-maxage": 0}))
    assert c.max_age == 0


def test_cache_control_header() -> None:
    c = parse(chat(), {"Cache-Control": "no-cache"})
    assert (c.read, c.write) == (False, True)
    c = parse(chat(), {"cache-control": "No-Store, max-age=30"})
    assert (c.read, c.write, c.max_age) == (True, False, 30)
    c = parse(chat({"s-maxage": 10}), Headers(cache_control="max-age=30, private"))
    assert c.max_age == 10  # the smaller one wins
    c = parse(chat({"s-maxage": 100}), Headers(**{"Cache-Control": 's-maxage="20"'}))
    assert c.max_age == 20


def test_mode_default_off_needs_use_cache() -> None:
    off = replace(ON, mode="default_off")
    assert not parse(chat(), settings=off).active
    c = parse(chat({"use-cache": True}), settings=off)
    assert (c.read, c.write) == (True, True)
    c = parse(chat({"use-cache": True, "no-store": True}), settings=off)
    assert (c.read, c.write) == (True, False)
    assert not parse(chat({"use-cache": False})).active  # explicit opt-out in default_on


def test_disabled_and_unsupported_call_types() -> None:
    assert not parse(chat({"use-cache": True}), settings=CacheSettings(enabled=False)).active
    only_emb = replace(ON, supported_call_types=("embeddings",))
    assert not parse(chat(), settings=only_emb).active
    assert parse({"model": "e", "input": "x"}, settings=only_emb).active
    assert parse({"model": "e", "input": "x"}, settings=only_emb, endpoint="embeddings").active
    assert not parse(chat(), settings=only_emb, endpoint="chat/completions").active
    comp = replace(ON, supported_call_types=("completions",))
    assert parse({"model": "c", "prompt": "x"}, settings=comp).active


@pytest.mark.parametrize(
    ("cache", "param"),
    [
        ("no-cache", "cache"),
        (["ttl"], "cache"),
        ({"ttl": "ten"}, "cache.ttl"),
        ({"ttl": -1}, "cache.ttl"),
        ({"ttl": 0}, "cache.ttl"),
        ({"ttl": True}, "cache.ttl"),
        ({"ttl": float("inf")}, "cache.ttl"),
        ({"s-maxage": -5}, "cache.s-maxage"),
        ({"no-cache": "yes"}, "cache.no-cache"),
        ({"no-store": 1}, "cache.no-store"),
        ({"use-cache": "true"}, "cache.use-cache"),
        ({"namespace": ""}, "cache.namespace"),
        ({"namespace": "a b"}, "cache.namespace"),
        ({"namespace": 5}, "cache.namespace"),
        ({"nocache": True}, "cache.nocache"),
    ],
)
def test_invalid_body_controls_are_400_naming_the_param(cache: object, param: str) -> None:
    with pytest.raises(ProxyError) as err:
        parse(chat(cache))
    assert err.value.status == 400
    assert err.value.param == param
    assert param in err.value.message


@pytest.mark.parametrize("header", ["max-age=abc", "max-age=-1", "max-age=", "s-maxage=1.5"])
def test_invalid_header_is_400(header: str) -> None:
    with pytest.raises(ProxyError) as err:
        parse(chat(), {"Cache-Control": header})
    assert err.value.status == 400 and err.value.param == "Cache-Control"


def test_null_values_mean_absent() -> None:
    body = chat(None)
    body["cache"] = None
    c = parse(body)
    assert c.read and c.write and "cache" not in body
    assert parse(chat({"ttl": None, "no-cache": None})).ttl == 300
