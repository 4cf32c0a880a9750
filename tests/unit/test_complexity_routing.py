"""Complexity routers without mitmproxy: LiteLLM's config, the tier decision (overrides,
sessions, budget step-down), a real Engine against fake Ollama and Anthropic backends, and the
spend-log columns (old files and spill lines included)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from mitmroute.config import ConfigError, load_config, parse_config
from mitmroute.engine import Engine
from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange, TierRoute, Usage
from mitmroute.request import ClientRequest
from mitmroute.routing.complexity import COMPLEX, MEDIUM, REASONING, SIMPLE
from mitmroute.routing.complexity_router import tier_override
from mitmroute.routing.complexity_sessions import SessionKey, SessionTiers, session_key
from mitmroute.spend import SpendLog, schema
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeBackend
from tests.redis_process import RedisProcess

DATA = Path(__file__).resolve().parents[1] / "data"
CLAUDE_KEY = "sk-ant-backend-0123456789"
EASY = "hi, thanks!"
HARD = (
    "Design a distributed rate limiter for three regions with per-customer limits that hold "
    "within 5% globally; discuss consistency, failure modes and trade-offs."
)


def entry(name: str, model: str, base: str | None = None, **params: Any) -> dict[str, Any]:
    litellm = {"model": model, **params}
    if base is not None:
        litellm["api_base"] = base
    return {"model_name": name, "litellm_params": litellm}


def router(name: str = "auto", tiers: dict | None = None, **config: Any) -> dict[str, Any]:
    """A LiteLLM `auto_router/complexity_router` entry, as LiteLLM's docs write it."""
    tiers = tiers or {
        "SIMPLE": "local-qwen",
        "MEDIUM": "local-qwen",
        "COMPLEX": "claude-opus-4",
        "REASONING": "claude-opus-4",
    }
    return entry(
        name,
        "auto_router/complexity_router",
        complexity_router_default_model="claude-opus-4",
        complexity_router_config={"classifier_type": "heuristic", "tiers": tiers, **config},
    )


def seed_style(ollama: str = "http://127.0.0.1:9", claude: str = "http://127.0.0.1:9", **cfg):
    return {
        "model_list": [
            entry("local-qwen", "ollama/qwen3:32b", ollama),
            entry("claude-opus-4", "anthropic/claude-opus-4-20250514", claude, api_key=CLAUDE_KEY),
            router("gpt-4o", **cfg),
        ],
        "router_settings": {"num_retries": 0},
        "general_settings": {"passthrough_unknown_models": False},
    }


# --- config -----------------------------------------------------------------------------------


def test_litellm_auto_router_entry_loads_unchanged_and_is_not_a_deployment(caplog):
    raw = seed_style()
    raw["model_list"][2]["litellm_params"]["complexity_router_config"].update(
        {
            "tier_boundaries": {"simple_medium": 0.1, "medium_complex": 0.3},
            "token_thresholds": {"simple": 10, "complex": 300},
            "dimension_weights": {"codePresence": 0.4},
            "custom_technical_keywords": ["kafka"],
            "keyword_tier_rules": [{"keywords": ["invoice"], "tier": "SIMPLE"}],
            "session_affinity_ttl_seconds": 60,
            "adaptive": False,  # LiteLLM-only: warned about, ignored
        }
    )
    config = parse_config(raw, environ={})
    assert [d.model_name for d in config.deployments] == ["local-qwen", "claude-opus-4"]
    auto = config.complexity_routers["gpt-4o"]
    assert auto.groups == ("local-qwen", "local-qwen", "claude-opus-4", "claude-opus-4")
    assert auto.baseline == "claude-opus-4" and auto.session_ttl == 60
    assert auto.classifier.boundaries == (0.1, 0.3, 0.5)
    assert auto.classifier.weights["codePresence"] == 0.4
    assert "kafka" in auto.classifier.technical.words
    assert "complexity_router_config.adaptive" in caplog.text


def test_unmapped_tiers_go_to_the_default_model():
    config = parse_config(seed_style(tiers={"SIMPLE": "local-qwen"}), environ={})
    assert config.complexity_routers["gpt-4o"].groups == (
        "local-qwen",
        "claude-opus-4",
        "claude-opus-4",
        "claude-opus-4",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tiers": {"SIMPLE": "nope"}}, "tiers.SIMPLE: unknown model group 'nope'"),
        ({"tiers": {"SIMPLE": ["local-qwen"]}}, "a list of models per tier is not supported"),
        ({"tiers": {"EASY": "local-qwen"}}, "tiers.EASY: not a tier"),
        ({"classifier_type": "llm"}, "classifier_type: mitmroute classifies in-process only"),
        ({"tier_boundaries": {"simple_medium": 0.9}}, "tier_boundaries: must increase"),
        ({"budget_step_down": 1.5}, "budget_step_down: a share of the budget"),
        ({"dimension_weights": {"vibes": 1}}, "dimension_weights.vibes: unknown dimension"),
    ],
)
def test_a_bad_router_config_stops_start_up_naming_the_key(change, message):
    raw = seed_style()
    raw["model_list"][2]["litellm_params"]["complexity_router_config"].update(change)
    with pytest.raises(ConfigError, match=r"model_list\[2\]\.litellm_params") as e:
        parse_config(raw, environ={})
    assert message in str(e.value)


def test_a_router_may_not_shadow_a_group_nor_be_another_auto_router():
    raw = seed_style()
    raw["model_list"][2]["model_name"] = "local-qwen"
    with pytest.raises(ConfigError, match="names a model group already"):
        parse_config(raw, environ={})
    raw = seed_style()
    raw["model_list"][2]["litellm_params"]["model"] = "auto_router/auto_router"
    with pytest.raises(ConfigError, match="only auto_router/complexity_router is supported"):
        parse_config(raw, environ={})


def test_tiers_may_name_an_alias_and_the_seed_configs_still_load():
    raw = seed_style(tiers={"SIMPLE": "cheap", "REASONING": "claude-opus-4"})
    raw["router_settings"]["model_group_alias"] = {"cheap": "local-qwen"}
    assert parse_config(raw, environ={}).complexity_routers["gpt-4o"].groups[0] == "local-qwen"
    env = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "LITELLM_MASTER_KEY": "k"}
    for name in ("litellm-basic.yaml", "litellm-production.yaml"):
        assert load_config(DATA / name, environ=env).complexity_routers == {}


def test_budget_step_down_goes_to_the_next_tier_served_by_another_group():
    auto = parse_config(seed_style(), environ={}).complexity_routers["gpt-4o"]
    assert auto.step_down(REASONING, 1) == MEDIUM  # COMPLEX is the same group: skipped
    assert auto.step_down(COMPLEX, 1) == MEDIUM
    assert auto.step_down(MEDIUM, 1) == MEDIUM  # nothing cheaper
    assert auto.step_down(REASONING, 0) == REASONING


# --- overrides and sessions --------------------------------------------------------------------


def test_tier_override_by_header_or_metadata_and_a_bad_one_is_a_400():
    assert tier_override({"x-mitmroute-tier": "complex"}, {}) == (COMPLEX, "header")
    assert tier_override({}, {"metadata": {"tier": "SIMPLE"}}) == (SIMPLE, "metadata")
    assert tier_override({"x-mitmroute-tier": "auto"}, {"metadata": {"tier": "SIMPLE"}}) is None
    assert tier_override({}, {"metadata": {"other": 1}}) is None
    with pytest.raises(ProxyError) as e:
        tier_override({"x-mitmroute-tier": "GOLD"}, {})
    assert e.value.status == 400 and e.value.param == "x-mitmroute-tier"
    with pytest.raises(ProxyError) as e:
        tier_override({}, {"metadata": {"tier": 3}})
    assert e.value.param == "metadata.tier"


def conversation(*turns: str) -> dict[str, Any]:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": "be brief"}]
    messages += [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
    return {"messages": messages}


def test_a_session_is_its_header_else_its_first_messages_scoped_by_key():
    names = ("x-session-id", "session-id")
    a = session_key("auto", "key-a", {"session-id": "s1"}, {}, names)
    assert a is not None and a.source == "header" and not a.fresh
    assert a == session_key("auto", "key-a", {"x-session-id": "s1"}, {}, names)
    assert a != session_key("auto", "key-b", {"session-id": "s1"}, {}, names)
    assert a != session_key("other", "key-a", {"session-id": "s1"}, {}, names)
    meta = session_key("auto", "key-a", {}, {"metadata": {"session_id": "s1"}}, names)
    assert meta == a
    first = session_key("auto", "k", {}, conversation("design X"), names)
    later = session_key("auto", "k", {}, conversation("design X", "ok", "thanks"), names)
    assert first is not None and later is not None
    assert first.fresh and not later.fresh and first.digest == later.digest
    assert session_key("auto", "k", {}, conversation("design Y"), names) != first
    assert session_key("auto", "k", {}, {"prompt": "x"}, names) is None


async def test_a_session_never_drops_below_its_highest_tier_until_idle_for_its_ttl():
    now = [1000.0]
    tiers = SessionTiers(clock=lambda: now[0])
    key = SessionKey("s", False, "header")
    assert await tiers.hold(key, COMPLEX, ttl=60) == COMPLEX
    assert await tiers.hold(key, SIMPLE, ttl=60) == COMPLEX
    now[0] += 50
    assert await tiers.hold(key, MEDIUM, ttl=60) == COMPLEX  # each request refreshes the TTL
    now[0] += 61
    assert await tiers.hold(key, SIMPLE, ttl=60) == SIMPLE
    assert await tiers.hold(SessionKey("s", True, "conversation"), SIMPLE, ttl=60) == SIMPLE


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    yield server
    server.kill()


async def test_sessions_are_shared_through_redis_and_redis_trouble_never_fails_a_request(
    own_redis: RedisProcess,
):
    from mitmroute.auth import RedisTarget

    target = RedisTarget(url=own_redis.url)
    one, two = SessionTiers.connect(target, "t"), SessionTiers.connect(target, "t")
    key = SessionKey("shared", False, "header")
    try:
        await one.start()
        await two.start()
        assert await one.hold(key, REASONING, ttl=30) == REASONING
        assert await two.hold(key, SIMPLE, ttl=30) == REASONING  # another proxy's record
        fresh = SessionKey("shared", True, "conversation")
        assert await two.hold(fresh, SIMPLE, ttl=30) == SIMPLE  # a new conversation restarts
        own_redis.kill()
        started = time.monotonic()
        assert await one.hold(key, MEDIUM, ttl=30) == REASONING  # this process still knows
        assert await one.hold(SessionKey("new", False, "header"), MEDIUM, ttl=30) == MEDIUM
        assert time.monotonic() - started < 0.5
    finally:
        await one.close()
        await two.close()


# --- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=CLAUDE_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def ollama() -> Iterator[str]:
    fake = FakeBackend()
    yield fake.start()
    fake.stop()


@pytest.fixture
async def engine(claude: FakeAnthropic, ollama: str) -> AsyncIterator[Engine]:
    raw = seed_style(ollama, claude.base_url, budget_step_down=[0.5, 0.9])
    raw["litellm_settings"] = {"cache": True}
    engine = Engine(parse_config(raw, environ={}))
    engine.records = []  # type: ignore[attr-defined]
    engine.listeners.append(engine.records.append)  # type: ignore[attr-defined]
    yield engine
    await engine.close()


async def chat(
    engine: Engine,
    text: str | list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    identity: dict[str, Any] | None = None,
    **body: Any,
) -> tuple[Any, Exchange]:
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    payload = json.dumps({"model": "gpt-4o", "messages": messages, **body}).encode()
    request = ClientRequest(
        "POST",
        "/v1/chat/completions",
        {"authorization": "Bearer sk-app", **(headers or {})},
        payload,
        identity=identity or {},
    )
    reply = await engine.handle(request)
    if reply.stream is not None:
        async for _ in reply.stream:
            pass
    assert reply.exchange is not None
    return reply, reply.exchange


async def test_an_easy_question_goes_to_ollama_and_a_hard_one_to_claude(engine: Engine):
    easy, ex = await chat(engine, EASY)
    assert easy.status == 200, easy.body
    assert easy.headers["x-mitmroute-deployment"] == "ollama/qwen3:32b"
    assert easy.headers["x-mitmroute-tier"] == "SIMPLE"
    assert easy.headers["x-mitmroute-route-reason"] == "classifier"
    assert ex.model_group == "local-qwen" and ex.requested_model == "gpt-4o"
    assert ex.cost_usd == 0 and ex.tier_route is not None
    # the same tokens on claude-opus-4 ($15 / $75 per million)
    assert ex.usage is not None
    assert ex.tier_route.baseline_cost_usd == Decimal(
        ex.usage.prompt_tokens * 15 + ex.usage.completion_tokens * 75
    ) / Decimal(10**6)
    hard, ex = await chat(engine, HARD, stream=True)
    assert hard.status == 200
    assert hard.headers["x-mitmroute-deployment"] == "anthropic/claude-opus-4-20250514"
    assert hard.headers["x-mitmroute-tier"] == "COMPLEX"
    assert ex.tier_route is not None and ex.tier_route.score is not None
    assert ex.cost_usd is not None and ex.cost_usd > 0
    assert ex.tier_route.baseline_cost_usd == ex.cost_usd


async def test_the_tier_is_chosen_before_the_cache(engine: Engine):
    first, _ = await chat(engine, "hello there")
    forced, ex = await chat(engine, "hello there", {"x-mitmroute-tier": "REASONING"})
    again, hit = await chat(engine, "hello there")
    assert first.headers["x-mitmroute-cache"] == "MISS"
    assert forced.headers["x-mitmroute-cache"] == "MISS"  # another group: another entry
    assert forced.headers["x-mitmroute-route-reason"] == "header"
    assert ex.model_group == "claude-opus-4"
    assert again.headers["x-mitmroute-cache"] == "HIT" and hit.tier_route is not None
    assert hit.tier_route.tier == "SIMPLE" and hit.tier_route.baseline_cost_usd is None


async def test_a_session_stays_on_claude_after_a_hard_turn(engine: Engine):
    session = {"x-session-id": "agent-1"}
    await chat(engine, HARD, session)
    reply, ex = await chat(engine, EASY, session)
    assert reply.headers["x-mitmroute-tier"] == "COMPLEX"
    assert reply.headers["x-mitmroute-route-reason"] == "classifier+session"
    assert ex.model_group == "claude-opus-4"
    other, _ = await chat(engine, EASY, {"x-session-id": "agent-2"})
    assert other.headers["x-mitmroute-tier"] == "SIMPLE"
    # no header: the conversation is known by its first messages
    history = [
        {"role": "user", "content": HARD},
        {"role": "assistant", "content": "Here is a design..."},
        {"role": "user", "content": "thanks!"},
    ]
    await chat(engine, history[:1])
    follow_up, _ = await chat(engine, history)
    assert follow_up.headers["x-mitmroute-route-reason"] == "classifier+session"


async def test_an_override_wins_over_the_session_without_lowering_it(engine: Engine):
    session = {"session_id": "agent-3"}
    await chat(engine, HARD, session)
    cheap, _ = await chat(engine, EASY, {**session, "x-mitmroute-tier": "simple"})
    assert cheap.headers["x-mitmroute-tier"] == "SIMPLE"
    later, _ = await chat(engine, EASY, session)
    assert later.headers["x-mitmroute-tier"] == "COMPLEX"
    meta, _ = await chat(engine, EASY, metadata={"tier": "MEDIUM"})
    assert meta.headers["x-mitmroute-route-reason"] == "metadata"
    bad, ex = await chat(engine, EASY, {"x-mitmroute-tier": "cheap"})
    assert bad.status == 400 and ex.status_code == 400


async def test_a_key_over_its_budget_share_steps_down_a_tier(engine: Engine):
    reply, ex = await chat(engine, HARD, identity={"budget_share": 0.6})
    assert reply.headers["x-mitmroute-tier"] == "MEDIUM"
    assert reply.headers["x-mitmroute-route-reason"] == "classifier+budget"
    assert ex.model_group == "local-qwen"
    below, _ = await chat(engine, HARD, identity={"budget_share": 0.4})
    assert below.headers["x-mitmroute-tier"] == "COMPLEX"
    session = {"x-session-id": "agent-4"}
    await chat(engine, HARD, session)
    stepped, _ = await chat(engine, EASY, session, identity={"budget_share": 0.95})
    assert stepped.headers["x-mitmroute-route-reason"] == "classifier+session+budget"
    assert stepped.headers["x-mitmroute-tier"] == "MEDIUM"


async def test_the_router_is_listed_and_embeddings_go_to_the_default(engine: Engine):
    reply = await engine.handle(ClientRequest("GET", "/v1/models", {}, b""))
    assert "gpt-4o" in [m["id"] for m in json.loads(reply.body)["data"]]
    assert engine.group_of("gpt-4o") == "claude-opus-4"
    payload = json.dumps({"model": "gpt-4o", "input": "x"}).encode()
    embed = await engine.handle(ClientRequest("POST", "/v1/embeddings", {}, payload))
    assert embed.exchange is not None and embed.exchange.tier_route is not None
    assert embed.exchange.tier_route.reason == "default"
    assert embed.exchange.model_group == "claude-opus-4"


async def test_classifying_adds_little_to_a_request(engine: Engine):
    request = ClientRequest(
        "POST",
        "/v1/chat/completions",
        {"x-session-id": "s"},
        json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": HARD}]}).encode(),
    )
    body = json.loads(request.body)
    times = []
    for _ in range(200):
        started = time.perf_counter()
        await engine.tiers.route("gpt-4o", request, body, "chat/completions", Exchange("r", T0, ""))
        times.append(time.perf_counter() - started)
    times.sort()
    assert times[len(times) // 2] < 0.001


# --- spend log ----------------------------------------------------------------------------------

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def routed(i: int, tier: str, cost: str, baseline: str | None, **kw: Any) -> Exchange:
    return Exchange(
        request_id=f"r{i}",
        started_at=T0,
        ended_at=T0,
        endpoint="chat/completions",
        requested_model="gpt-4o",
        model_group="local-qwen" if tier == "SIMPLE" else "claude-opus-4",
        status_code=200,
        team="team-a",
        usage=Usage(100, 20),
        cost_usd=Decimal(cost),
        tier_route=TierRoute(
            "gpt-4o",
            tier,
            "classifier",
            0.1,
            "claude-opus-4",
            None if baseline is None else Decimal(baseline),
        ),
        **kw,
    )


def test_the_spend_log_records_tier_reason_and_baseline_and_sums_the_savings(tmp_path: Path):
    db = tmp_path / "spend.duckdb"
    log = SpendLog(db, flush_interval=0.05).start()
    log.record(routed(1, "SIMPLE", "0", "0.003"))
    log.record(routed(2, "SIMPLE", "0", "0.003"))
    log.record(routed(3, "COMPLEX", "0.003", "0.003"))
    log.record(routed(4, "SIMPLE", "0", None))  # baseline unpriced: counted, not summed
    log.record(Exchange("r5", T0, "chat/completions", status_code=200, requested_model="x"))
    assert log.close()
    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute(
            "SELECT route_tier, route_reason, route_score, baseline_cost_usd FROM spend_log "
            "WHERE request_id = 'r1'"
        ).fetchone()
        assert row == ("SIMPLE", "classifier", 0.1, Decimal("0.003"))
        savings = con.execute(
            "SELECT sum(requests), sum(unpriced), sum(cost_usd), sum(baseline_cost_usd), "
            "sum(saved_by_routing_usd) FROM routing_savings"
        ).fetchone()
        assert savings == (4, 1, Decimal("0.003"), Decimal("0.009"), Decimal("0.006"))


def test_an_older_spend_log_file_and_spill_line_gain_the_new_columns(tmp_path: Path):
    db = tmp_path / "spend.duckdb"
    old_columns = schema.SPEND_LOG[: schema.V1_WIDTH]
    with duckdb.connect(str(db)) as con:
        con.execute(schema._create("spend_log", old_columns))
        con.execute("INSERT INTO spend_log (request_id, status_code) VALUES ('old', 200)")
    log = SpendLog(db, flush_interval=30)
    old_row, _ = log.rows.build(routed(7, "SIMPLE", "0", "0.001"))
    line = json.dumps([list(old_row[: schema.V1_WIDTH]), []])
    Path(f"{db}.spill.jsonl").write_text(line.replace('"r7"', '"spilled"') + "\n")
    log.start()
    log.record(routed(8, "COMPLEX", "0.002", "0.002"))
    assert log.close()
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT request_id, route_tier, baseline_cost_usd FROM spend_log ORDER BY 1"
        ).fetchall()
    assert rows == [
        ("old", None, None),
        ("r8", "COMPLEX", Decimal("0.002")),
        ("spilled", None, None),
    ]


async def test_metadata_tier_is_mitmroutes_and_never_goes_upstream(engine: Engine):
    from mitmroute.routing.complexity_router import ComplexityRouters

    routers: ComplexityRouters = engine.tiers
    for metadata, left in (
        ({"tier": "SIMPLE", "app": "x"}, {"app": "x"}),
        ({"tier": "SIMPLE"}, None),
    ):
        body = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": HARD}],
            "metadata": metadata,
        }
        request = ClientRequest("POST", "/v1/chat/completions", {}, b"")
        group = await routers.route(
            "gpt-4o", request, body, "chat/completions", Exchange("r", T0, "")
        )
        assert group == "local-qwen" and body.get("metadata") == left
