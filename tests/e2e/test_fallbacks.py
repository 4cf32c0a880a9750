"""Fallback ladders, retries and cooldowns: a failing backend is invisible to the app."""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import deployment, free_port

MSG = [{"role": "user", "content": "are you there"}]


def ok(name: str, backend, model: str = "ok-model", **params):
    return deployment(name, f"openai/{model}", f"{backend.url}/v1", api_key="sk-b", **params)


def ask(proxy, model: str, **kwargs):
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG, **kwargs)
        return raw.parse(), raw.headers


@pytest.fixture(scope="module")
def ladder(backend, confdir, tmp_path_factory):
    from tests.conftest import Proxy

    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = {
        "model_list": [
            ok("gpt-4o", backend, "fail-500"),
            ok("claude-opus", backend, "reset"),
            ok("local-qwen", backend, "qwen-answer"),
            ok("limited", backend, "ratelimit-1"),
            ok("limited-backup", backend, "backup-answer"),
            ok("hangs", backend, "hang", timeout=0.5),
            ok("big", backend, "context"),
            ok("big-context", backend, "long-context-answer"),
            ok("policy", backend, "policy"),
            deployment("dead-1", "openai/a", dead, api_key="k"),
            deployment("dead-2", "openai/b", dead, api_key="k"),
            deployment("dead-3", "openai/c", dead, api_key="k"),
            ok("flaky", backend, "flaky-2"),
            ok("two-deployments", backend, "fail-503"),
            ok("two-deployments", backend, "healthy-twin"),
            ok("stream-primary", backend, "fail-502"),
            ok("stream-backup", backend, "stream-backup-answer"),
            ok("breaks", backend, "break"),
            deployment("mixed", "ollama/qwen3:8b", backend.url),
            ok("mixed", backend, "openai-sibling"),
            deployment("ollama-only", "ollama/qwen3:8b", backend.url),
        ],
        "router_settings": {
            "fallbacks": [
                {"gpt-4o": ["claude-opus", "local-qwen"]},
                {"limited": ["limited-backup"]},
                {"hangs": ["local-qwen"]},
                {"dead-1": ["dead-2", "dead-3"]},
                {"stream-primary": ["stream-backup"]},
            ],
            "context_window_fallbacks": [{"big": ["big-context"]}],
            "num_retries": 2,
            "cooldown_time": 1,
        },
    }
    proxy = Proxy(config, confdir, tmp_path_factory.mktemp("ladder"))
    yield proxy
    proxy.stop()


def test_seed_ladder_falls_through_500_and_reset_to_the_healthy_group(ladder):
    completion, headers = ask(ladder, "gpt-4o")
    assert completion.choices[0].message.content == "echo: are you there"
    assert completion.model == "qwen-answer"  # the model that answered, not the one asked
    assert headers["x-mitmroute-deployment"] == "openai/qwen-answer"
    assert headers["x-mitmroute-attempts"] == "3"


def test_rate_limited_deployment_cools_for_its_retry_after(ladder):
    _, first = ask(ladder, "limited")
    assert first["x-mitmroute-deployment"] == "openai/backup-answer"
    assert first["x-mitmroute-attempts"] == "2"
    _, second = ask(ladder, "limited")  # primary is cooling: not even tried
    assert second["x-mitmroute-attempts"] == "1"
    time.sleep(1.2)  # Retry-After: 1 has passed
    _, third = ask(ladder, "limited")
    assert third["x-mitmroute-attempts"] == "2"


def test_timeout_falls_back_within_the_deployment_timeout(ladder):
    t0 = time.perf_counter()
    _, headers = ask(ladder, "hangs")
    elapsed = time.perf_counter() - t0
    assert headers["x-mitmroute-deployment"] == "openai/qwen-answer"
    assert 0.5 <= elapsed < 1.5


def test_context_window_error_uses_context_window_fallbacks(ladder):
    completion, headers = ask(ladder, "big")
    assert completion.model == "long-context-answer"
    assert headers["x-mitmroute-attempts"] == "2"


@pytest.mark.parametrize("stream", [False, True])
def test_other_4xx_go_back_unchanged_without_fallback(ladder, stream):
    with ladder.client() as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="policy", messages=MSG, stream=stream)
    assert info.value.code == "content_policy_violation"
    assert info.value.response.reason_phrase == "Bad Request"
    assert info.value.response.headers["x-mitmroute-attempts"] == "1"


def test_dead_ladder_of_three_says_what_was_tried(ladder):
    t0 = time.perf_counter()
    with ladder.client() as client, pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="dead-1", messages=MSG)
    elapsed = time.perf_counter() - t0
    assert info.value.status_code == 503
    message = info.value.message
    assert "openai/a" in message and "openai/b" in message and "openai/c" in message
    assert elapsed < 1.0  # connect errors on three groups: no sleeping between groups


def test_retries_with_backoff_on_the_last_group(ladder):
    completion, headers = ask(ladder, "flaky")
    assert completion.model == "flaky-2"
    assert headers["x-mitmroute-attempts"] == "3"


def test_other_deployment_of_the_group_takes_the_retry(ladder):
    for _ in range(3):
        completion, _headers = ask(ladder, "two-deployments")
        assert completion.model == "healthy-twin"


def test_stream_failing_before_first_byte_falls_back_transparently(ladder):
    with ladder.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="stream-primary", messages=MSG, stream=True
        )
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: are you there"
    assert chunks[0].model == "stream-backup-answer"
    assert raw.headers["x-mitmroute-deployment"] == "openai/stream-backup-answer"
    assert raw.headers["x-mitmroute-attempts"] == "2"


def test_stream_breaking_mid_way_raises_in_the_sdk(ladder):
    with ladder.client() as client:
        stream = client.chat.completions.create(model="breaks", messages=MSG, stream=True)
        received = []
        with pytest.raises(openai.APIError, match=r"broke the stream|ended the stream early"):
            for chunk in stream:
                received.append(chunk)
    assert received  # some content arrived before the break: never a silent success


def test_deployment_at_its_rpm_is_skipped_for_its_twin(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [
                ok("limited-pair", backend, "first-of-pair", rpm=2, weight=1000),
                ok("limited-pair", backend, "second-of-pair", rpm=100, weight=1),
                ok("solo", backend, "solo-model", rpm=1),
            ]
        }
    )
    answered = [ask(proxy, "limited-pair")[0].model for _ in range(6)]
    assert answered.count("first-of-pair") <= 2 and answered.count("second-of-pair") >= 4
    ask(proxy, "solo")
    with proxy.client() as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="solo", messages=MSG)


def test_a_parameter_one_deployment_cannot_take_goes_to_a_sibling_that_can(ladder):
    for _ in range(4):
        completion, _headers = ask(ladder, "mixed", logprobs=True)
        assert completion.model == "openai-sibling"
    with ladder.client() as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="ollama-only", messages=MSG, logprobs=True)
    assert info.value.param == "logprobs"


def test_with_no_backend_running_the_sdk_hears_at_once_which_deployments_are_down(start_proxy):
    """A first run of the example config without its backends: no seconds of retries."""
    dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    proxy = start_proxy(
        {
            "model_list": [
                deployment("gpt-4o", "openai/first", dead[0]),
                deployment("backup", "openai/second", dead[1]),
            ],
            "router_settings": {"fallbacks": [{"gpt-4o": ["backup"]}]},
        }
    )
    client = openai.OpenAI(api_key="sk-x", http_client=proxy.http())  # the SDK's own retries on
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    elapsed = time.monotonic() - started
    assert raised.value.status_code == 503
    assert raised.value.body["code"] == "all_deployments_unreachable"
    assert "openai/first" in raised.value.message and "openai/second" in raised.value.message
    assert elapsed < 3.0, elapsed  # was 12.5 s with the SDK's retries and cooldown waits
