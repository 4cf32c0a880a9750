"""`router_settings.routing_strategy`: which deployment each strategy picks, without a network."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from mitmroute import errors
from mitmroute.config import ConfigError, Deployment, StrategyArgs, parse_config
from mitmroute.exchange import Exchange, Usage
from mitmroute.request import now_utc
from mitmroute.routing.plan import Stop, Try
from mitmroute.routing.state import RoutingState


class Clock:
    def __init__(self, now: float = 1_000_020.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(group: str, model: str, **params: Any) -> dict[str, Any]:
    return {
        "model_name": group,
        "litellm_params": {"model": model, "api_base": "http://fake/v1", "api_key": "k", **params},
    }


def routing(model_list: list[dict[str, Any]], strategy: str, **settings: Any) -> RoutingState:
    raw = {"model_list": model_list, "router_settings": {"routing_strategy": strategy, **settings}}
    clock = Clock()
    return RoutingState(
        parse_config(raw, environ={}), clock=clock, wall=clock, rng=random.Random(3)
    )


def start(
    state: RoutingState, group: str = "g", rid: str = "r", stream: bool = False
) -> Deployment:
    """Plan a request and begin its first attempt."""
    step = state.plan(group, request_id=rid, stream=stream).next()
    assert isinstance(step, Try)
    return step.deployment


def finish(state: RoutingState, deployment: Deployment, rid: str, completion: int = 10) -> None:
    exchange = Exchange(rid, now_utc(), "chat/completions")
    exchange.usage = Usage(prompt_tokens=5, completion_tokens=completion)
    state.finished(deployment, exchange)


def ask(state: RoutingState, group: str = "g", seconds: float = 0.0, completion: int = 10) -> str:
    """One whole request that takes `seconds`; the model that answered."""
    clock = state.clock
    assert isinstance(clock, Clock)
    rid = f"r{clock.now}-{random.random()}"
    plan = state.plan(group, request_id=rid)
    step = plan.next()
    assert isinstance(step, Try)
    clock.now += seconds
    plan.succeeded(step.deployment)
    finish(state, step.deployment, rid, completion)
    return step.deployment.model


THREE = [entry("g", f"openai/{m}") for m in ("a", "b", "c")]


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "simple-shuffle",
        "least-busy",
        "latency-based-routing",
        "usage-based-routing-v2",
        "usage-based-routing",
        "cost-based-routing",
    ],
)
def test_litellms_strategy_names_are_accepted(name):
    config = parse_config({"router_settings": {"routing_strategy": name}}, environ={})
    assert config.router.routing_strategy == name


def test_an_unknown_strategy_stops_start_up_naming_its_key():
    with pytest.raises(
        ConfigError, match=r"^router_settings\.routing_strategy: unknown .*'fastest'"
    ):
        parse_config({"router_settings": {"routing_strategy": "fastest"}}, environ={})


def test_strategy_args_are_read_and_checked():
    raw = {"routing_strategy_args": {"ttl": 60, "lowest_latency_buffer": 0.5}}
    config = parse_config({"router_settings": raw}, environ={})
    assert config.router.routing_strategy_args == StrategyArgs(ttl=60, lowest_latency_buffer=0.5)
    bad = {"routing_strategy_args": {"lowest_latency_buffer": "lots"}}
    with pytest.raises(ConfigError, match=r"routing_strategy_args\.lowest_latency_buffer"):
        parse_config({"router_settings": bad}, environ={})


# --- simple-shuffle ------------------------------------------------------------------------


def test_simple_shuffle_is_weighted_by_weight_else_rpm():
    state = routing(
        [entry("g", "openai/heavy", weight=9), entry("g", "openai/light", weight=1)],
        "simple-shuffle",
    )
    counts = Counter(ask(state) for _ in range(1000))
    assert 850 < counts["heavy"] < 950
    state = routing(
        [entry("g", "openai/big", rpm=900), entry("g", "openai/small", rpm=100)], "simple-shuffle"
    )
    counts = Counter(start(state, rid=str(i)).model for i in range(500))
    assert counts.most_common(1)[0][0] == "big"


# --- least-busy ----------------------------------------------------------------------------


def test_least_busy_sends_each_new_request_to_the_deployment_with_fewest_in_flight():
    state = routing(THREE, "least-busy")
    first = [start(state, rid=f"r{i}") for i in range(3)]
    assert sorted(d.model for d in first) == ["a", "b", "c"]  # one each while all are busy
    second = [start(state, rid=f"s{i}") for i in range(3)]
    assert sorted(d.model for d in second) == ["a", "b", "c"]
    finish(state, first[0], "r0")  # one answer read to its end: that deployment is least busy
    assert start(state, rid="t") == first[0]


def test_least_busy_forgets_an_attempt_nobody_finished():
    state = routing(THREE, "least-busy", timeout=10)
    busy = start(state, rid="lost")
    assert all(start(state, rid=f"x{i}") != busy for i in range(2))
    state.clock.now += 10 + 301  # type: ignore[attr-defined]
    assert state.in_flight.count(busy.id) == 0


def test_least_busy_counts_a_failed_attempt_as_ended():
    state = routing(THREE[:2], "least-busy")
    plan = state.plan("g", request_id="r")
    step = plan.next()
    assert isinstance(step, Try)
    plan.failed(step.deployment, errors.upstream_timeout("slow"))
    assert state.in_flight.count(step.deployment.id) == 0


# --- latency-based-routing -------------------------------------------------------------------


def test_latency_based_tries_the_unmeasured_then_keeps_to_the_fastest():
    state = routing(THREE, "latency-based-routing")
    speed = {"a": 0.5, "b": 0.05, "c": 2.0}  # seconds per answer of 10 tokens
    answered = []
    for _ in range(20):
        clock_model = ask_timed(state, speed)
        answered.append(clock_model)
    assert sorted(answered[:3]) == ["a", "b", "c"]  # each measured once
    assert answered[3:] == ["b"] * 17


def ask_timed(state: RoutingState, speed: dict[str, float]) -> str:
    clock = state.clock
    assert isinstance(clock, Clock)
    rid = f"r{clock.now}"
    plan = state.plan("g", request_id=rid)
    step = plan.next()
    assert isinstance(step, Try)
    clock.now += speed[step.deployment.model]
    plan.succeeded(step.deployment)
    finish(state, step.deployment, rid, completion=10)
    return step.deployment.model


def test_latency_is_seconds_per_output_token_and_averages_the_last_samples():
    args = {"max_latency_list_size": 2}
    state = routing(THREE[:1], "latency-based-routing", routing_strategy_args=args)
    a = state.groups["g"][0]
    for seconds in (1.0, 2.0, 4.0):
        ask(state, seconds=seconds, completion=10)
    assert state.latency.average(a.id) == pytest.approx(0.3)  # (0.2 + 0.4) / 2


def test_lowest_latency_buffer_shares_load_among_the_near_fastest():
    state = routing(
        THREE, "latency-based-routing", routing_strategy_args={"lowest_latency_buffer": 0.5}
    )
    speed = {"a": 1.0, "b": 1.4, "c": 2.0}  # b within 50 % of a; c not
    answered = Counter(ask_timed(state, speed) for _ in range(200))
    assert answered["a"] > 50 and answered["b"] > 50 and answered["c"] == 1


def test_latency_samples_expire_after_ttl():
    state = routing(THREE[:2], "latency-based-routing", routing_strategy_args={"ttl": 60})
    speed = {"a": 0.1, "b": 5.0}
    for _ in range(4):
        ask_timed(state, speed)
    a, b = state.groups["g"]
    assert state.latency.average(b.id) is not None
    state.clock.now += 61  # type: ignore[attr-defined]
    assert state.latency.average(b.id) is None  # forgotten: b is tried again
    state.latency.record(a.id, "latency", 0.01)
    assert ask_timed(state, speed) == "b"


def test_streams_are_routed_by_time_to_first_token():
    state = routing(THREE[:2], "latency-based-routing")
    a, b = state.groups["g"]
    state.latency.record(a.id, "latency", 0.01)  # fast per token overall...
    state.latency.record(b.id, "latency", 0.05)
    state.latency.record(a.id, "ttft", 3.0)  # ...but slow to start
    state.latency.record(b.id, "ttft", 0.2)
    assert start(state, rid="s", stream=True) == b
    assert start(state, rid="n", stream=False) == a


def test_a_timeout_counts_as_a_very_slow_answer():
    state = routing(THREE[:2], "latency-based-routing", allowed_fails=100)
    a, b = state.groups["g"]
    state.latency.record(a.id, "latency", 0.01)
    state.latency.record(b.id, "latency", 0.02)
    plan = state.plan("g", request_id="t")
    step = plan.next()
    assert isinstance(step, Try) and step.deployment == a
    plan.failed(a, errors.upstream_timeout("no answer"))
    assert start(state, rid="next") == b


# --- usage-based-routing-v2 ---------------------------------------------------------------


def test_usage_based_picks_the_fewest_tokens_this_minute():
    state = routing(THREE, "usage-based-routing-v2")
    used: Counter[str] = Counter()
    for i in range(30):
        completion = 1 + (i * 7) % 13
        lowest = min(used[m] for m in "abc")
        model = ask(state, completion=completion)
        assert used[model] == lowest
        used[model] += 5 + completion


def test_usage_counts_start_again_each_minute():
    state = routing(THREE[:2], "usage-based-routing-v2")
    a, b = state.groups["g"]
    state.limits.used(a, 1000)
    assert start(state, rid="1") == b
    state.clock.now += 60  # type: ignore[attr-defined]
    assert state.limits.tokens(a) == 0


def test_usage_based_skips_a_deployment_at_its_tpm():
    state = routing(
        [entry("g", "openai/a", tpm=100), entry("g", "openai/b")], "usage-based-routing"
    )
    a, b = state.groups["g"]
    state.limits.used(a, 100)
    state.limits.used(b, 5000)
    assert start(state, rid="1") == b


# --- cost-based-routing --------------------------------------------------------------------


def test_cost_based_picks_the_cheapest_until_it_fails():
    model_list = [
        entry("g", "openai/pricey", input_cost_per_token=1e-5, output_cost_per_token=3e-5),
        entry("g", "openai/cheap", input_cost_per_token=1e-7, output_cost_per_token=1e-7),
        entry("g", "openai/mid", input_cost_per_token=1e-6, output_cost_per_token=2e-6),
    ]
    state = routing(model_list, "cost-based-routing", allowed_fails=0, num_retries=0)
    assert {ask(state) for _ in range(20)} == {"cheap"}
    plan = state.plan("g", request_id="f")
    tried = []
    while not isinstance(step := plan.next(), Stop):
        assert isinstance(step, Try)
        tried.append(step.deployment.model)
        plan.failed(step.deployment, errors.upstream_unreachable("down"))
    assert tried == ["cheap", "mid", "pricey"]  # each once, cheapest first
    state.clock.now += 6  # type: ignore[attr-defined]
    assert ask(state) == "cheap"  # rested: cheapest again


def test_cost_based_reads_the_price_book_and_puts_unpriced_last():
    model_list = [
        entry("g", "openai/some-unpriced-model"),
        entry("g", "openai/gpt-4o"),
        entry("g", "openai/gpt-4o-mini"),
    ]
    state = routing(model_list, "cost-based-routing")
    assert ask(state) == "gpt-4o-mini"
    assert [d.model for d in sorted(state.groups["g"], key=state.strategy.price)] == [  # type: ignore[attr-defined]
        "gpt-4o-mini",
        "gpt-4o",
        "some-unpriced-model",
    ]


def test_cost_based_treats_a_free_local_model_as_cheapest():
    model_list = [entry("g", "openai/gpt-4o-mini"), entry("g", "ollama/qwen3:8b", api_key=None)]
    state = routing(model_list, "cost-based-routing")
    assert ask(state) == "qwen3:8b"
