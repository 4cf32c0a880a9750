"""The routing plan, driven as the engine drives it, with a fake clock and scripted backends:
every promise of the README's "Fallbacks, retries, cooldowns", without a socket."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from mitmroute import errors
from mitmroute.config import Deployment, parse_config
from mitmroute.errors import ProxyError
from mitmroute.routing.plan import Stop, Try, Wait
from mitmroute.routing.state import RoutingState


class Clock:
    def __init__(self, now: float = 1_000_020.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(group: str, model: str, **params: Any) -> dict[str, Any]:
    params.setdefault("api_key", "sk-own")
    return {
        "model_name": group,
        "litellm_params": {"model": model, "api_base": "http://fake/v1", **params},
    }


def routing(model_list: list[dict[str, Any]], **router_settings: Any) -> RoutingState:
    config = parse_config(
        {"model_list": model_list, "router_settings": router_settings}, environ={}
    )
    clock = Clock()
    return RoutingState(config, clock=clock, wall=clock, rng=random.Random(7))


def fail(status: int, message: str = "boom", retry_after: str | None = None) -> ProxyError:
    error = errors.upstream_error(status, {"error": {"message": message}}, provider="openai")
    if retry_after is not None:
        error.headers["retry-after"] = retry_after
    return error


def unsupported() -> ProxyError:
    return ProxyError(400, "logprobs not supported", param="logprobs", kind="unsupported")


Outcome = ProxyError | str | Callable[[], ProxyError | str]


class Run:
    """One request driven to its end: what was tried, waited for, and how it ended."""

    def __init__(self, state: RoutingState, group: str, script: dict[str, Any], **kw: Any):
        self.trace: list[str | float] = []
        self.plan = state.plan(group, request_id=f"r{id(self)}", **kw)
        clock = state.clock
        assert isinstance(clock, Clock)
        while True:
            step = self.plan.next()
            if isinstance(step, Stop):
                self.error: ProxyError | None = step.error
                self.answer = None
                return
            if isinstance(step, Wait):
                self.trace.append(round(step.seconds, 3))
                clock.now += step.seconds
                continue
            assert isinstance(step, Try)
            deployment: Deployment = step.deployment
            self.trace.append(deployment.model)
            outcome = script.get(deployment.model, "ok")
            if isinstance(outcome, list):
                outcome = outcome.pop(0) if len(outcome) > 1 else outcome[0]
            if isinstance(outcome, tuple):  # (seconds it takes, outcome)
                clock.now += outcome[0]
                outcome = outcome[1]
            if isinstance(outcome, ProxyError):
                self.plan.failed(deployment, outcome)
                continue
            self.plan.succeeded(deployment)
            self.answer, self.error = deployment.model, None
            return

    @property
    def attempts(self) -> list[str]:
        return [t for t in self.trace if isinstance(t, str)]

    @property
    def waits(self) -> list[float]:
        return [t for t in self.trace if isinstance(t, float)]


SEED = [
    entry("gpt-4o", "openai/primary-a"),
    entry("gpt-4o", "openai/primary-b"),
    entry("claude", "openai/claude-x"),
    entry("local", "openai/local-x"),
]


def test_each_deployment_of_a_group_once_then_the_next_group_without_waiting():
    state = routing(SEED, fallbacks=[{"gpt-4o": ["claude", "local"]}])
    script = {
        "primary-a": fail(500),
        "primary-b": fail(503),
        "claude-x": errors.upstream_unreachable("refused"),
    }
    run = Run(state, "gpt-4o", script)
    assert sorted(run.attempts[:2]) == ["primary-a", "primary-b"]
    assert run.attempts[2:] == ["claude-x", "local-x"]
    assert run.waits == [] and run.answer == "local-x" and run.plan.fallback_used


def test_the_requested_group_answering_is_no_fallback():
    state = routing(SEED, fallbacks=[{"gpt-4o": ["claude"]}])
    run = Run(state, "gpt-4o", {})
    assert len(run.attempts) == 1 and not run.plan.fallback_used


def test_only_the_last_group_is_retried_num_retries_times_with_growing_backoff():
    state = routing(SEED, fallbacks=[{"claude": ["local"]}], num_retries=2, allowed_fails=100)
    run = Run(state, "claude", {"claude-x": fail(500), "local-x": fail(502)})
    assert run.attempts == ["claude-x", "local-x", "local-x", "local-x"]
    assert len(run.waits) == 2 and 0.125 <= run.waits[0] <= 0.25 and 0.25 <= run.waits[1] <= 0.5
    assert run.error is not None and run.error.status == 503
    assert run.error.code == "all_deployments_failed"
    assert "claude-x" in run.error.message and run.error.message.count("local-x") == 3


def test_a_retry_that_succeeds_answers():
    state = routing(SEED[2:3], num_retries=2)
    run = Run(state, "claude", {"claude-x": [fail(503), fail(503), "ok"]})
    assert run.attempts == ["claude-x"] * 3 and run.answer == "claude-x"


def test_retry_policy_counts_per_error_kind():
    state = routing(SEED[2:3], num_retries=3, retry_policy={"InternalServerErrorRetries": 0})
    run = Run(state, "claude", {"claude-x": fail(500)})
    assert run.attempts == ["claude-x"] and run.waits == []
    state = routing(SEED[2:3], num_retries=0, retry_policy={"TimeoutErrorRetries": 1})
    run = Run(state, "claude", {"claude-x": errors.upstream_timeout("slow")})
    assert run.attempts == ["claude-x"] * 2


def test_backoff_honours_retry_after_and_its_bound():
    state = routing(SEED[2:3], num_retries=1, allowed_fails=100)
    run = Run(state, "claude", {"claude-x": [fail(503, retry_after="2"), "ok"]})
    assert run.waits == [2.0] and run.answer == "claude-x"
    run = Run(state, "claude", {"claude-x": [fail(503, retry_after="999"), "ok"]})
    assert run.waits == [30.0]
    state = routing(SEED[2:3], num_retries=1, retry_after=0.75, allowed_fails=100)
    run = Run(state, "claude", {"claude-x": [fail(500), "ok"]})
    assert run.waits == [0.75]  # the config's floor


def test_a_429_rests_its_deployment_for_retry_after_and_the_last_group_waits_for_it():
    state = routing(SEED[2:3], num_retries=1)
    run = Run(state, "claude", {"claude-x": [fail(429, retry_after="1.5"), "ok"]})
    assert run.trace == ["claude-x", 1.5, "claude-x"] and run.answer == "claude-x"


def test_a_deployment_failing_more_than_allowed_fails_rests_for_cooldown_time():
    state = routing(SEED[:2], allowed_fails=1, cooldown_time=5)
    runs = [Run(state, "gpt-4o", {"primary-a": fail(500)}) for _ in range(30)]
    tried = [a for r in runs for a in r.attempts]
    assert tried.count("primary-a") == 2  # its second failure in a minute put it to rest
    assert all(r.answer == "primary-b" for r in runs)
    state.clock.now += 5.1  # type: ignore[attr-defined]
    runs = [Run(state, "gpt-4o", {"primary-a": fail(500)}) for _ in range(30)]
    assert any("primary-a" in r.attempts for r in runs)  # rested: tried again


def test_everything_resting_without_a_retry_due_is_a_429_with_no_attempt():
    state = routing(SEED[2:3], num_retries=0)
    Run(state, "claude", {"claude-x": fail(429, retry_after="20")})
    run = Run(state, "claude", {})
    assert run.attempts == [] and run.error is not None and run.error.status == 429
    assert "cooling down or at its rpm/tpm limit" in run.error.message


def test_context_window_and_content_policy_errors_take_their_own_ladders():
    model_list = [*SEED, entry("big", "openai/big-x"), entry("safe", "openai/safe-x")]
    state = routing(
        model_list,
        fallbacks=[{"gpt-4o": ["claude"]}],
        context_window_fallbacks=[{"gpt-4o": ["big"]}],
        content_policy_fallbacks=[{"*": ["safe"]}],
    )
    too_long = fail(400, "This model's maximum context length is 10 tokens.")
    run = Run(state, "gpt-4o", {"primary-a": too_long, "primary-b": too_long})
    assert run.attempts[1:] == ["big-x"] and run.plan.fallback_used
    refused = fail(400, "rejected by content policy")
    run = Run(state, "claude", {"claude-x": refused})
    assert run.attempts == ["claude-x", "safe-x"]


def test_other_4xx_go_back_unchanged_without_fallback_or_retry():
    state = routing(SEED, fallbacks=[{"gpt-4o": ["claude"]}], num_retries=3)
    bad = fail(400, "temperature must be below 2")
    run = Run(state, "gpt-4o", {"primary-a": bad, "primary-b": bad})
    assert len(run.attempts) == 1 and run.error is bad
    assert not any(state.cooldowns.cooling(d.id) for d in state.groups["gpt-4o"])


def test_nothing_starts_after_the_overall_deadline():
    state = routing(SEED, fallbacks=[{"gpt-4o": ["claude"]}], timeout=10, allowed_fails=100)
    run = Run(state, "gpt-4o", {"primary-a": (11, fail(500)), "primary-b": (11, fail(500))})
    assert len(run.attempts) == 1
    assert run.error is not None and "deadline of 10s reached" in run.error.message
    # a backoff that would end past the deadline is not slept
    state = routing(SEED[2:3], timeout=10, num_retries=2)
    run = Run(state, "claude", {"claude-x": (9.95, fail(503, retry_after="1"))})
    assert run.attempts == ["claude-x"] and run.waits == []
    assert run.error is not None and "deadline of 10s reached" in run.error.message


def test_time_left_shrinks_with_the_clock():
    state = routing(SEED[2:3], timeout=30)
    plan = state.plan("claude")
    state.clock.now += 12  # type: ignore[attr-defined]
    assert plan.time_left() == pytest.approx(18)


def test_unsupported_hands_over_to_a_sibling_without_resting():
    model_list = [entry("mixed", "ollama/qwen", api_key=None), entry("mixed", "openai/sibling")]
    state = routing(model_list)
    for _ in range(5):
        run = Run(state, "mixed", {"qwen": unsupported()})
        assert run.answer == "sibling"
    assert not any(state.cooldowns.cooling(d.id) for d in state.groups["mixed"])


def test_unsupported_everywhere_is_the_clients_400():
    state = routing([entry("only", "ollama/qwen", api_key=None)], num_retries=2)
    run = Run(state, "only", {"qwen": unsupported()})
    assert run.attempts == ["qwen"] and run.error is not None and run.error.param == "logprobs"


def test_a_deployments_own_key_refused_rests_it_and_a_sibling_answers():
    model_list = [entry("g", "openai/bad-key"), entry("g", "openai/good-key")]
    state = routing(model_list, cooldown_time=60)
    runs = [Run(state, "g", {"bad-key": fail(401, "Incorrect API key")}) for _ in range(20)]
    assert all(r.answer == "good-key" for r in runs)
    assert [a for r in runs for a in r.attempts].count("bad-key") == 1
    bad = next(d for d in state.groups["g"] if d.model == "bad-key")
    assert state.cooldowns.remaining(bad.id) == pytest.approx(60)


def test_a_keyless_deployments_401_is_the_clients_own_and_goes_back():
    state = routing([entry("g", "openai/x", api_key=None), entry("g", "openai/y", api_key=None)])
    run = Run(state, "g", {"x": fail(401, "Incorrect API key"), "y": fail(401, "Incorrect")})
    assert len(run.attempts) == 1 and run.error is not None and run.error.status == 401


def test_a_plan_that_has_stopped_stays_stopped():
    state = routing(SEED[2:3], num_retries=0)
    run = Run(state, "claude", {"claude-x": fail(500)})
    assert isinstance(run.plan.next(), Stop) and run.plan.next().error is run.error


def test_nothing_listening_anywhere_is_a_503_the_sdks_do_not_retry():
    """The example config with no backend running: the client hears at once, and why."""
    state = routing(SEED, fallbacks=[{"gpt-4o": ["claude", "local"]}], num_retries=0)
    refused = errors.upstream_unreachable("refused")
    script = {m: refused for m in ("primary-a", "primary-b", "claude-x", "local-x")}
    run = Run(state, "gpt-4o", script)
    assert run.error is not None and run.error.status == 503
    assert run.error.code == "all_deployments_unreachable"
    assert run.error.headers["x-should-retry"] == "false"
    assert all(m in run.error.message for m in ("primary-a", "claude-x", "local-x"))
    # one backend that answered (badly) is worth the client's retry
    state = routing(SEED, fallbacks=[{"gpt-4o": ["claude", "local"]}], num_retries=0)
    run = Run(state, "gpt-4o", {**script, "local-x": fail(500)})
    assert run.error is not None and run.error.code == "all_deployments_failed"
    assert "x-should-retry" not in run.error.headers
