"""Response cache through the real proxy: local by default, Redis when configured."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from tests.conftest import deployment, free_port, wait_for_port


def cached_config(backend, cache_params: dict | None = None, **general) -> dict:
    return {
        "model_list": [
            deployment("gpt-4o", "openai/cache-model", f"{backend.url}/v1", api_key="k"),
            deployment("gpt-4o", "openai/cache-model", f"{backend.url}/v1", api_key="k2"),
            deployment("slow", "openai/slow-100", f"{backend.url}/v1", api_key="k"),
        ],
        "litellm_settings": {"cache": True, "cache_params": cache_params or {"type": "local"}},
        "general_settings": general,
    }


def calls(backend, model: str) -> int:
    return sum(1 for r in backend.state.requests if r.get("model") == model)


def unique_messages() -> list[dict]:
    return [{"role": "user", "content": f"cache me {uuid.uuid4().hex[:8]}"}]


def test_local_cache_hit_skips_the_backend_and_says_so(start_proxy, backend):
    proxy = start_proxy(cached_config(backend))
    messages = unique_messages()
    with proxy.client() as client:
        first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
        before = calls(backend, "cache-model")
        second = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, user="someone-else", temperature=None
        )
    assert first.headers["x-mitmroute-cache"] == "MISS"
    assert second.headers["x-mitmroute-cache"] == "HIT"
    assert second.headers["x-mitmroute-cache-key"] == first.headers["x-mitmroute-cache-key"]
    assert calls(backend, "cache-model") == before
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content


def test_streamed_hit_is_a_real_multi_chunk_stream(start_proxy, backend):
    proxy = start_proxy(cached_config(backend))
    messages = [
        {"role": "user", "content": "a streamed answer of several words " + uuid.uuid4().hex[:6]}
    ]
    with proxy.client() as client:
        plain = client.chat.completions.create(model="gpt-4o", messages=messages)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(raw.parse())
    assert raw.headers["x-mitmroute-cache"] == "HIT"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content for c in content_chunks)
        == plain.choices[0].message.content
    )
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_streamed_answer_is_cached_for_a_plain_request(start_proxy, backend):
    proxy = start_proxy(cached_config(backend))
    messages = unique_messages()
    with proxy.client() as client:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
            if c.choices
        )
        time.sleep(0.1)
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
    assert raw.headers["x-mitmroute-cache"] == "HIT"
    assert raw.parse().choices[0].message.content == text


def test_per_request_controls(start_proxy, backend):
    proxy = start_proxy(cached_config(backend))
    messages = unique_messages()
    with proxy.client() as client:

        def ask(**kw):
            return client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=messages, **kw
            ).headers["x-mitmroute-cache"]

        assert ask(extra_body={"cache": {"no-store": True}}) == "MISS"
        assert ask() == "MISS"  # nothing was stored
        assert ask() == "HIT"
        assert ask(extra_body={"cache": {"no-cache": True}}) == "MISS"
        assert ask(extra_headers={"Cache-Control": "no-cache"}) == "MISS"
        time.sleep(1.1)
        assert ask(extra_headers={"Cache-Control": "max-age=1"}) == "MISS"
    # the `cache` object never goes upstream
    assert all("cache" not in r for r in backend.state.requests)


def test_concurrent_identical_requests_reach_the_backend_once(start_proxy, backend):
    proxy = start_proxy(cached_config(backend))
    messages = [{"role": "user", "content": f"together {uuid.uuid4().hex[:6]} a b c"}]
    before = calls(backend, "slow-100")

    async def run():
        async with proxy.async_client() as client:
            return await asyncio.gather(
                *[client.chat.completions.create(model="slow", messages=messages) for _ in range(8)]
            )

    results = asyncio.run(run())
    assert len({r.choices[0].message.content for r in results}) == 1
    assert calls(backend, "slow-100") - before == 1


def test_redis_cache_is_shared_by_two_proxies_and_expires(start_proxy, backend):
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    params = {"type": "redis", "host": "127.0.0.1", "port": 6379, "ttl": 1, "namespace": namespace}
    first_proxy = start_proxy(cached_config(backend, params))
    second_proxy = start_proxy(cached_config(backend, params))
    messages = unique_messages()
    r = redis.Redis(host="127.0.0.1", port=6379)

    def stored() -> bool:  # the entry itself (a flight's lock lives beside it meanwhile)
        return bool(r.exists(miss.headers["x-mitmroute-cache-key"]))

    def until(condition, timeout: float = 10.0) -> None:  # the write is off the request path
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    try:
        with first_proxy.client() as a, second_proxy.client() as b:
            for client in (a, b):  # a proxy's first TLS connection can outlast the 1 s ttl
                client.chat.completions.create(model="gpt-4o", messages=unique_messages())
            miss = a.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
            until(stored)
            hit = b.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
            until(lambda: not stored())  # Redis expires it after the 1 s ttl
            expired = b.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
        assert miss.headers["x-mitmroute-cache"] == "MISS"
        assert hit.headers["x-mitmroute-cache"] == "HIT"
        assert expired.headers["x-mitmroute-cache"] == "MISS"
    finally:
        for key in r.scan_iter(f"{namespace}*"):
            r.delete(key)
        r.close()


def test_redis_outage_never_fails_a_request(start_proxy, backend, tmp_path):
    assert shutil.which("redis-server"), "redis-server must be installed on this machine kind"
    port = free_port()
    cmd = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        proxy = start_proxy(
            cached_config(backend, {"type": "redis", "host": "127.0.0.1", "port": port})
        )
        with proxy.client() as client:
            messages = unique_messages()
            client.chat.completions.create(model="gpt-4o", messages=messages)
            server.terminate()
            server.wait(5)
            for i in range(5):
                t0 = time.perf_counter()
                answer = client.chat.completions.create(model="gpt-4o", messages=unique_messages())
                assert answer.choices[0].message.content.startswith("echo:")
                assert time.perf_counter() - t0 < 0.5, f"request {i} slowed by the outage"
            server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            wait_for_port(port)
            time.sleep(1.5)  # the breaker probes about once a second
            client.chat.completions.create(model="gpt-4o", messages=messages)
            again = client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=messages
            )
        assert again.headers["x-mitmroute-cache"] == "HIT"  # reconnected by itself
        assert proxy.logs().count("redis unavailable") == 1
    finally:
        server.terminate()
        server.wait(5)


@pytest.mark.parametrize("mode", ["default_off"])
def test_default_off_mode_caches_only_on_request(start_proxy, backend, mode):
    proxy = start_proxy(cached_config(backend, {"type": "local", "mode": mode}))
    messages = unique_messages()
    with proxy.client() as client:

        def ask(**kw):
            return client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=messages, **kw
            ).headers.get("x-mitmroute-cache")

        assert ask() in (None, "MISS")
        assert ask() in (None, "MISS")
        assert ask(extra_body={"cache": {"use-cache": True}}) == "MISS"
        assert ask(extra_body={"cache": {"use-cache": True}}) == "HIT"
