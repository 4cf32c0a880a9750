"""Load and validate a LiteLLM-style config.yaml into typed, ready-to-use settings.

Every problem is reported with the key path that caused it, e.g.
``model_list[2].litellm_params.api_base: not a URL``. Unknown keys only warn (once each), so a
config written for LiteLLM loads unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from mitmroute.routing.complexity_tiers import TierRouterSettings, is_auto_router, parse_router

log = logging.getLogger(__name__)

ENV_PREFIX = "os.environ/"

DEFAULT_CONFIG: dict[str, Any] = {
    # Embedded defaults: plain OpenAI, passthrough for everything else, local spend log.
    "model_list": [],
    "general_settings": {},
}

PROVIDER_DEFAULT_BASES = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "ollama": "http://localhost:11434",
    "ollama_chat": "http://localhost:11434",
}
# Providers that speak the OpenAI wire protocol and need an api_base to be useful.
OPENAI_COMPATIBLE = {
    "openai",
    "hosted_vllm",
    "vllm",
    "openai_like",
    "text-completion-openai",
    "groq",
    "lm_studio",
    "llamacpp",
    "together_ai",
    "deepseek",
    "mistral",
    "fireworks_ai",
    "xai",
    "openrouter",
    "azure",
}
KNOWN_PROVIDERS = OPENAI_COMPATIBLE | {"anthropic", "ollama", "ollama_chat"}

KNOWN_LITELLM_PARAMS = {
    "model",
    "api_key",
    "api_base",
    "api_version",
    "rpm",
    "tpm",
    "timeout",
    "stream_timeout",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "max_tokens",
    "organization",
    "weight",
    "order",
    "max_retries",
    "drop_params",
    "extra_headers",
    "custom_llm_provider",
    "tags",
}
KNOWN_MODEL_ENTRY = {"model_name", "litellm_params", "model_info"}
KNOWN_ROUTER_SETTINGS = {
    "fallbacks",
    "context_window_fallbacks",
    "content_policy_fallbacks",
    "num_retries",
    "retry_after",
    "retry_policy",
    "allowed_fails",
    "allowed_fails_policy",
    "cooldown_time",
    "timeout",
    "stream_timeout",
    "routing_strategy",
    "routing_strategy_args",
    "redis_host",
    "redis_port",
    "redis_password",
    "redis_url",
    "enable_pre_call_checks",
    "default_fallbacks",
    "model_group_alias",
    "max_fallbacks",
}
KNOWN_GENERAL_SETTINGS = {
    "intercept_hosts",
    "spend_db",
    "spend_buffer_rows",
    "spend_on_buffer_full",
    "spend_data_path",
    "max_request_size_mb",
    "passthrough_paths",
    "passthrough_unknown_models",
    "master_key",
    "database_url",
    "alerting",
    "alerting_threshold",
    "alerting_webhook_url",
    "budget_duration",
    "max_budget",
    "metrics_port",
    "spend_alerts",
    "price_file",
    "request_timeout",
    "allow_requests_on_db_unavailable",
}
KNOWN_LITELLM_SETTINGS = {
    "cache",
    "cache_params",
    "drop_params",
    "set_verbose",
    "callbacks",
    "success_callback",
    "failure_callback",
    "num_retries",
    "request_timeout",
    "json_logs",
    "turn_off_message_logging",
}
KNOWN_TOP_LEVEL = {
    "model_list",
    "router_settings",
    "general_settings",
    "litellm_settings",
    "environment_variables",
}

_warned_unknown: set[str] = set()


class ConfigError(ValueError):
    """An invalid config value; the message starts with the key path."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """One `model_list` entry: a concrete backend that can answer a model group."""

    model_name: str
    provider: str
    model: str
    """The model name as the backend knows it (after the provider prefix)."""
    litellm_model: str
    """The `litellm_params.model` as written, e.g. `openai/gpt-4o`."""
    api_base: str = field(repr=False)
    """As configured: it may carry credentials (user:password@, ?key=); `public_base` not."""
    api_key: str | None = field(default=None, repr=False)
    """Never in a repr (nor in a log line or traceback that prints one)."""
    rpm: int | None = None
    tpm: int | None = None
    timeout: float | None = None
    stream_timeout: float | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    cache_read_input_token_cost: float | None = None
    cache_creation_input_token_cost: float | None = None
    weight: float = 1.0
    extra_headers: dict[str, str] = field(default_factory=dict, repr=False)
    """May hold credentials too (`api-key`, `x-api-key`): not in a repr either."""
    index: int = 0
    id: str = field(init=False, repr=False, compare=False)
    """A stable, readable identifier for logs and cooldown state (one per entry: two entries
    differing only in their key are two deployments)."""
    public_base: str = field(init=False, compare=False)
    """`api_base` without credentials or query: safe for clients, logs and the spend log."""

    def __post_init__(self) -> None:
        # read on every attempt, in routing and in the books: parse the URL once, not each time
        public_base = public_url(self.api_base)
        object.__setattr__(self, "public_base", public_base)
        object.__setattr__(self, "id", f"{self.litellm_model}@{public_base}#{self.index}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often to retry each error class within one model group."""

    num_retries: int = 2
    retry_after: float = 0.0
    per_error: dict[str, int] = field(default_factory=dict)


ROUTING_STRATEGIES = (
    "simple-shuffle",
    "least-busy",
    "latency-based-routing",
    "usage-based-routing-v2",
    "usage-based-routing",
    "cost-based-routing",
)
"""LiteLLM's names; `usage-based-routing` (its deprecated v1) means the same as v2 here."""


@dataclass(frozen=True, slots=True)
class StrategyArgs:
    """`router_settings.routing_strategy_args` (LiteLLM's names; the latency strategy's)."""

    ttl: float = 3600.0
    """Seconds a deployment's latency samples are kept after it was last measured."""
    lowest_latency_buffer: float = 0.0
    """Share above the lowest latency still picked at random (0.5: within 50 %)."""
    max_latency_list_size: int = 10
    """Latency samples averaged per deployment."""


@dataclass(frozen=True, slots=True)
class RouterSettings:
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    context_window_fallbacks: dict[str, list[str]] = field(default_factory=dict)
    content_policy_fallbacks: dict[str, list[str]] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    allowed_fails: int = 3
    cooldown_time: float = 5.0
    timeout: float = 600.0
    stream_timeout: float | None = None
    routing_strategy: str = "simple-shuffle"
    routing_strategy_args: StrategyArgs = field(default_factory=StrategyArgs)
    model_group_alias: dict[str, str] = field(default_factory=dict)
    redis_host: str | None = None
    redis_port: int | None = None
    redis_password: str | None = None
    redis_url: str | None = None
    """Shared state (keys, budgets, rate limits) for several proxies; see `mitmroute.auth`."""


DEFAULT_CALL_TYPES = ("chat_completions", "completions", "embeddings")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = False
    type: str = "local"
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = None
    url: str | None = None
    ttl: float | None = None
    namespace: str = "mitmroute"
    supported_call_types: tuple[str, ...] = DEFAULT_CALL_TYPES
    mode: str = "default_on"
    scope: str = "global"
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_item_bytes: int = 1024 * 1024


DEFAULT_MAX_REQUEST_SIZE_MB = 32.0
DEFAULT_PASSTHROUGH_PATHS = ("/v1/*",)
DEFAULT_INTERCEPT_HOSTS = ("api.openai.com", "api.anthropic.com")


@dataclass(frozen=True, slots=True)
class GeneralSettings:
    intercept_hosts: tuple[str, ...] = DEFAULT_INTERCEPT_HOSTS
    spend_db: str = "./spend.duckdb"
    spend_buffer_rows: int = 100_000
    """Cap of spend rows held in memory while neither the db nor its spill file can be written."""
    spend_on_buffer_full: str = "refuse"
    """At that cap: `refuse` new requests with 503, or `drop` their rows (counted)."""
    passthrough_unknown_models: bool = True
    master_key: str | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    metrics_port: int | None = None
    alerting: tuple[str, ...] = ()
    alerting_threshold: float | None = None
    alerting_webhook_url: str | None = None
    spend_alerts: tuple[dict[str, Any], ...] = ()
    price_file: str | None = None
    database_url: str | None = None
    """postgresql://...: the spend log is the shared ledger (mitmroute.spend.lake), its
    catalog in that database, instead of the file spend_db."""
    spend_data_path: str | None = None
    """With database_url: the directory of the shared ledger's Parquet files, one every proxy
    can reach (default: spend-data beside spend_db, enough for the proxies of one host)."""
    max_request_size_mb: float = DEFAULT_MAX_REQUEST_SIZE_MB
    """Largest request body accepted on an intercepted host, after decompression."""
    passthrough_paths: tuple[str, ...] = DEFAULT_PASSTHROUGH_PATHS
    """Path globs of an intercepted host that go to the original host unrouted."""

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_size_mb * 1024 * 1024)

    allow_requests_on_db_unavailable: bool = False
    """Redis (the shared key cache and counters) down: serve virtual keys from the keys file
    with in-process limits instead of answering 503 `auth_unavailable`."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The whole validated config."""

    deployments: tuple[Deployment, ...] = ()
    router: RouterSettings = field(default_factory=RouterSettings)
    general: GeneralSettings = field(default_factory=GeneralSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    drop_params: bool = False
    callbacks: tuple[str, ...] = ()
    source: str = "<built-in defaults>"
    complexity_routers: dict[str, TierRouterSettings] = field(default_factory=dict)
    """`auto_router/complexity_router` entries of model_list, by model name (not deployments:
    each routes a request to one of its tiers' model groups; see routing/complexity_tiers.py)."""

    def groups(self) -> dict[str, list[Deployment]]:
        """Deployments by model group name, in config order."""
        out: dict[str, list[Deployment]] = {}
        for d in self.deployments:
            out.setdefault(d.model_name, []).append(d)
        return out


# --- value helpers -----------------------------------------------------------------------------


def _resolve_env(value: Any, path: str, environ: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX) :]
        if name not in environ:
            raise ConfigError(f"{path}: environment variable {name} is not set")
        return environ[name]
    return value


def _warn_unknown(section: dict[str, Any], known: set[str], path: str) -> None:
    for key in section:
        if key not in known:
            full = f"{path}.{key}" if path else key
            if full not in _warned_unknown:
                _warned_unknown.add(full)
                log.warning("config: unknown key %s is ignored", full)


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def _number(value: Any, path: str, *, minimum: float = 0, integer: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{path}: not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: not a number: {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum}, got {value}")
    if integer:
        if value != int(value):
            raise ConfigError(f"{path}: not an integer: {value!r}")
        return int(value)
    return float(value)


def _bool(value: Any, path: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
        return value.lower() in {"true", "yes", "1"}
    raise ConfigError(f"{path}: not a boolean: {value!r}")


def _weight(value: Any, path: str) -> float:
    weight = _number(value, path)
    return 1.0 if weight is None else weight


def public_url(url: str) -> str:
    """`url` without userinfo, query or fragment."""
    parts = urlparse(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host, query="", fragment="").geturl()


def _url(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: not a URL: {value!r}")
    parsed = urlparse(value)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ConfigError(f"{path}: not a URL: {value!r}")
    return value.rstrip("/")


def _str_list(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: expected a list of strings")
    return list(value)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|mo)?$")


def parse_duration(value: Any, path: str) -> float:
    """Parse `30s`, `30m`, `24h`, `30d` (or a number of seconds) into seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value).strip())
    if not m:
        raise ConfigError(f"{path}: not a duration (like 30s, 30m, 24h, 30d): {value!r}")
    scale = {"s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "mo": 30 * 86400}[m.group(2)]
    return float(m.group(1)) * scale


# --- sections ---------------------------------------------------------------------------------


def _split_model(litellm_model: str, params: dict[str, Any], path: str) -> tuple[str, str]:
    provider, sep, model = litellm_model.partition("/")
    if not sep:
        provider, model = str(params.get("custom_llm_provider") or "openai"), litellm_model
    if provider not in KNOWN_PROVIDERS:
        raise ConfigError(
            f"{path}: unknown provider {provider!r} (known: {', '.join(sorted(KNOWN_PROVIDERS))})"
        )
    if not model:
        raise ConfigError(f"{path}: model name missing after provider prefix")
    return provider, model


def _deployment(entry: Any, i: int, environ: dict[str, str]) -> Deployment:
    path = f"model_list[{i}]"
    entry = _mapping(entry, path)
    _warn_unknown(entry, KNOWN_MODEL_ENTRY, "model_list[]")
    name = entry.get("model_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}.model_name: required, a non-empty string")
    params = {
        k: _resolve_env(v, f"{path}.litellm_params.{k}", environ)
        for k, v in _mapping(entry.get("litellm_params"), f"{path}.litellm_params").items()
    }
    _warn_unknown(params, KNOWN_LITELLM_PARAMS, "model_list[].litellm_params")
    p = f"{path}.litellm_params"
    litellm_model = params.get("model")
    if not isinstance(litellm_model, str) or not litellm_model:
        raise ConfigError(f"{p}.model: required, e.g. openai/gpt-4o")
    provider, model = _split_model(litellm_model, params, f"{p}.model")
    if params.get("api_base") is not None:
        api_base = _url(params["api_base"], f"{p}.api_base")
    elif provider in PROVIDER_DEFAULT_BASES:
        api_base = PROVIDER_DEFAULT_BASES[provider]
    else:
        raise ConfigError(f"{p}.api_base: required for provider {provider!r}")
    api_key = params.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise ConfigError(f"{p}.api_key: expected a string")
    headers = _mapping(params.get("extra_headers"), f"{p}.extra_headers")
    return Deployment(
        model_name=name,
        provider=provider,
        model=model,
        litellm_model=litellm_model,
        api_base=api_base,
        api_key=api_key,
        rpm=_number(params.get("rpm"), f"{p}.rpm", integer=True),
        tpm=_number(params.get("tpm"), f"{p}.tpm", integer=True),
        timeout=_number(params.get("timeout"), f"{p}.timeout"),
        stream_timeout=_number(params.get("stream_timeout"), f"{p}.stream_timeout"),
        input_cost_per_token=_number(
            params.get("input_cost_per_token"), f"{p}.input_cost_per_token"
        ),
        output_cost_per_token=_number(
            params.get("output_cost_per_token"), f"{p}.output_cost_per_token"
        ),
        cache_read_input_token_cost=_number(
            params.get("cache_read_input_token_cost"), f"{p}.cache_read_input_token_cost"
        ),
        cache_creation_input_token_cost=_number(
            params.get("cache_creation_input_token_cost"), f"{p}.cache_creation_input_token_cost"
        ),
        weight=_weight(params.get("weight"), f"{p}.weight"),
        extra_headers={str(k): str(v) for k, v in headers.items()},
        index=i,
    )


def _ladder(value: Any, path: str, groups: set[str]) -> dict[str, list[str]]:
    """Parse `[{group: [fallback, ...]}, ...]` (LiteLLM's form) or a plain mapping."""
    if value is None:
        return {}
    items = value if isinstance(value, list) else [value]
    out: dict[str, list[str]] = {}
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]" if isinstance(value, list) else path
        for group, targets in _mapping(item, item_path).items():
            names = _str_list(targets, f"{item_path}.{group}")
            for name in [group, *names]:
                if name != "*" and name not in groups:
                    raise ConfigError(f"{item_path}.{group}: unknown model group {name!r}")
            out.setdefault(str(group), []).extend(names)
    return out


RETRY_POLICY_KEYS = {
    "BadRequestErrorRetries",
    "AuthenticationErrorRetries",
    "TimeoutErrorRetries",
    "RateLimitErrorRetries",
    "ContentPolicyViolationErrorRetries",
    "InternalServerErrorRetries",
    "ServiceUnavailableErrorRetries",
    "APIConnectionErrorRetries",
}


def _retry_policy(router: dict[str, Any], path: str) -> RetryPolicy:
    num_retries = _number(router.get("num_retries", 2), f"{path}.num_retries", integer=True)
    retry_after = _number(router.get("retry_after", 0), f"{path}.retry_after")
    per_error: dict[str, int] = {}
    policy = _mapping(router.get("retry_policy"), f"{path}.retry_policy")
    for key, value in policy.items():
        kp = f"{path}.retry_policy.{key}"
        if key == "num_retries":
            num_retries = _number(value, kp, integer=True)
        elif key == "retry_after":
            retry_after = _number(value, kp)
        elif key in RETRY_POLICY_KEYS:
            per_error[key] = _number(value, kp, integer=True)
        else:
            raise ConfigError(f"{kp}: unknown retry policy key")
    return RetryPolicy(num_retries=num_retries, retry_after=retry_after, per_error=per_error)


def _routing_strategy(value: Any, path: str) -> str:
    if value is None:
        return "simple-shuffle"
    if value not in ROUTING_STRATEGIES:
        raise ConfigError(
            f"{path}.routing_strategy: unknown routing strategy {value!r} "
            f"(known: {', '.join(ROUTING_STRATEGIES)})"
        )
    return str(value)


def _strategy_args(value: Any, path: str) -> StrategyArgs:
    path = f"{path}.routing_strategy_args"
    args = _mapping(value, path)
    _warn_unknown(args, {"ttl", "lowest_latency_buffer", "max_latency_list_size"}, path)
    default = StrategyArgs()
    size = _number(
        args.get("max_latency_list_size"), f"{path}.max_latency_list_size", minimum=1, integer=True
    )
    ttl = _number(args.get("ttl"), f"{path}.ttl")
    buffer = _number(args.get("lowest_latency_buffer"), f"{path}.lowest_latency_buffer")
    return StrategyArgs(
        ttl=default.ttl if ttl is None else ttl,
        lowest_latency_buffer=default.lowest_latency_buffer if buffer is None else buffer,
        max_latency_list_size=default.max_latency_list_size if size is None else size,
    )


def _router_settings(raw: Any, groups: set[str], environ: dict[str, str]) -> RouterSettings:
    path = "router_settings"
    r = {k: _resolve_env(v, f"{path}.{k}", environ) for k, v in _mapping(raw, path).items()}
    _warn_unknown(r, KNOWN_ROUTER_SETTINGS, path)
    alias = {
        str(k): str(v)
        for k, v in _mapping(r.get("model_group_alias"), f"{path}.model_group_alias").items()
    }
    known = groups | set(alias)
    return RouterSettings(
        fallbacks=_ladder(r.get("fallbacks"), f"{path}.fallbacks", known),
        context_window_fallbacks=_ladder(
            r.get("context_window_fallbacks"), f"{path}.context_window_fallbacks", known
        ),
        content_policy_fallbacks=_ladder(
            r.get("content_policy_fallbacks"), f"{path}.content_policy_fallbacks", known
        ),
        retry=_retry_policy(r, path),
        allowed_fails=_number(r.get("allowed_fails", 3), f"{path}.allowed_fails", integer=True),
        cooldown_time=_number(r.get("cooldown_time", 5), f"{path}.cooldown_time"),
        timeout=_number(r.get("timeout", 600), f"{path}.timeout"),
        stream_timeout=_number(r.get("stream_timeout"), f"{path}.stream_timeout"),
        routing_strategy=_routing_strategy(r.get("routing_strategy"), path),
        routing_strategy_args=_strategy_args(r.get("routing_strategy_args"), path),
        model_group_alias=alias,
        redis_host=r.get("redis_host"),
        redis_port=_number(r.get("redis_port"), f"{path}.redis_port", integer=True),
        redis_password=r.get("redis_password"),
        redis_url=r.get("redis_url"),
    )


def _database_url(value: Any, path: str) -> str | None:
    """A PostgreSQL URL (the shared spend ledger), or None; an empty value is None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or urlparse(value).scheme not in ("postgresql", "postgres"):
        shown = value.split("@")[-1] if isinstance(value, str) else type(value).__name__
        raise ConfigError(
            f"{path}: expected postgresql://user[:password]@host[:port]/dbname, got ...{shown!r}"
        )
    if not urlparse(value).path.strip("/"):
        raise ConfigError(f"{path}: the URL names no database (postgresql://host/DBNAME)")
    return value


def _optional_str(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: expected a non-empty string")
    return value


def _general_settings(raw: Any, environ: dict[str, str]) -> GeneralSettings:
    path = "general_settings"
    g = {k: _resolve_env(v, f"{path}.{k}", environ) for k, v in _mapping(raw, path).items()}
    _warn_unknown(g, KNOWN_GENERAL_SETTINGS, path)
    hosts = _str_list(
        g.get("intercept_hosts", list(DEFAULT_INTERCEPT_HOSTS)), f"{path}.intercept_hosts"
    )
    if not hosts:
        raise ConfigError(f"{path}.intercept_hosts: must name at least one host")
    master_key = g.get("master_key")
    if master_key is not None and (not isinstance(master_key, str) or not master_key):
        raise ConfigError(f"{path}.master_key: expected a non-empty string")
    if g.get("budget_duration") is not None:
        parse_duration(g["budget_duration"], f"{path}.budget_duration")
    alerts = g.get("spend_alerts") or []
    if not isinstance(alerts, list) or not all(isinstance(a, dict) for a in alerts):
        raise ConfigError(f"{path}.spend_alerts: expected a list of mappings")
    webhook = g.get("alerting_webhook_url")
    metrics_port = _number(g.get("metrics_port"), f"{path}.metrics_port", integer=True)
    buffer_rows = _number(
        g.get("spend_buffer_rows", 100_000), f"{path}.spend_buffer_rows", minimum=1, integer=True
    )
    on_full = g.get("spend_on_buffer_full", "refuse")
    if on_full not in ("refuse", "drop"):
        raise ConfigError(
            f"{path}.spend_on_buffer_full: expected 'refuse' or 'drop', got {on_full!r}"
        )
    return GeneralSettings(
        intercept_hosts=tuple(h.lower() for h in hosts),
        spend_db=str(g.get("spend_db", "./spend.duckdb")),
        spend_buffer_rows=100_000 if buffer_rows is None else buffer_rows,
        spend_on_buffer_full=on_full,
        passthrough_unknown_models=_bool(
            g.get("passthrough_unknown_models"), f"{path}.passthrough_unknown_models", True
        ),
        master_key=master_key,
        max_budget=_number(g.get("max_budget"), f"{path}.max_budget"),
        budget_duration=g.get("budget_duration"),
        metrics_port=metrics_port,
        alerting=tuple(_str_list(g.get("alerting"), f"{path}.alerting")),
        alerting_threshold=_number(g.get("alerting_threshold"), f"{path}.alerting_threshold"),
        alerting_webhook_url=_url(webhook, f"{path}.alerting_webhook_url") if webhook else None,
        spend_alerts=tuple(alerts),
        price_file=g.get("price_file"),
        database_url=_database_url(g.get("database_url"), f"{path}.database_url"),
        spend_data_path=_optional_str(g.get("spend_data_path"), f"{path}.spend_data_path"),
        max_request_size_mb=_max_request_size(g.get("max_request_size_mb"), path),
        passthrough_paths=tuple(_passthrough_paths(g.get("passthrough_paths"), path)),
        allow_requests_on_db_unavailable=_bool(
            g.get("allow_requests_on_db_unavailable"),
            f"{path}.allow_requests_on_db_unavailable",
            False,
        ),
    )


def _max_request_size(value: Any, path: str) -> float:
    if value is None:
        return DEFAULT_MAX_REQUEST_SIZE_MB
    size = _number(value, f"{path}.max_request_size_mb")
    if size <= 0:
        raise ConfigError(f"{path}.max_request_size_mb: must be above 0, got {value!r}")
    return float(size)


def _passthrough_paths(value: Any, path: str) -> list[str]:
    if value is None:
        return list(DEFAULT_PASSTHROUGH_PATHS)
    globs = _str_list(value, f"{path}.passthrough_paths")
    for i, glob in enumerate(globs):
        if not glob.startswith("/"):
            raise ConfigError(f"{path}.passthrough_paths[{i}]: must start with /, got {glob!r}")
    return globs


def _cache_settings(settings: dict[str, Any], environ: dict[str, str]) -> CacheSettings:
    path = "litellm_settings.cache_params"
    enabled = _bool(settings.get("cache"), "litellm_settings.cache", False)
    p = {
        k: _resolve_env(v, f"{path}.{k}", environ)
        for k, v in _mapping(settings.get("cache_params"), path).items()
    }
    cache_type = str(p.get("type", "local"))
    if cache_type not in {"local", "redis"}:
        raise ConfigError(f"{path}.type: expected 'local' or 'redis', got {cache_type!r}")
    mode = str(p.get("mode", "default_on"))
    if mode not in {"default_on", "default_off"}:
        raise ConfigError(f"{path}.mode: expected 'default_on' or 'default_off', got {mode!r}")
    scope = str(p.get("scope", "global"))
    if scope not in {"global", "key", "team"}:
        raise ConfigError(f"{path}.scope: expected global, key or team, got {scope!r}")
    url = p.get("url")
    if url is not None and not str(url).startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{path}.url: not a redis:// URL: {url!r}")
    call_types = tuple(_str_list(p.get("supported_call_types"), f"{path}.supported_call_types"))
    # LiteLLM names call types after its functions; accept both spellings.
    aliases = {
        "completion": "chat_completions",
        "acompletion": "chat_completions",
        "text_completion": "completions",
        "atext_completion": "completions",
        "embedding": "embeddings",
        "aembedding": "embeddings",
    }
    call_types = tuple(aliases.get(c, c) for c in call_types) or DEFAULT_CALL_TYPES
    return CacheSettings(
        enabled=enabled,
        type=cache_type,
        host=str(p.get("host", "127.0.0.1")),
        port=_number(p.get("port", 6379), f"{path}.port", integer=True),
        password=p.get("password"),
        url=url,
        ttl=_number(p.get("ttl"), f"{path}.ttl"),
        namespace=str(p.get("namespace") or "mitmroute"),
        supported_call_types=call_types,
        mode=mode,
        scope=scope,
        max_entries=_number(p.get("max_entries", 10_000), f"{path}.max_entries", integer=True),
        max_bytes=_number(p.get("max_bytes", 64 << 20), f"{path}.max_bytes", integer=True),
        max_item_bytes=_number(
            p.get("max_item_bytes", 1 << 20), f"{path}.max_item_bytes", integer=True
        ),
    )


def parse_config(
    raw: Any, *, environ: dict[str, str] | None = None, source: str = "<dict>"
) -> RouterConfig:
    """Validate a parsed YAML document; raise ConfigError naming the key path on bad input."""
    environ = dict(os.environ) if environ is None else environ
    raw = _mapping(raw, "<root>")
    _warn_unknown(raw, KNOWN_TOP_LEVEL, "")
    model_list = raw.get("model_list") or []
    if not isinstance(model_list, list):
        raise ConfigError("model_list: expected a list")
    routers = {
        i: e
        for i, e in enumerate(model_list)
        if isinstance(e, dict) and is_auto_router(e.get("litellm_params"))
    }
    deployments = tuple(
        _deployment(e, i, environ) for i, e in enumerate(model_list) if i not in routers
    )
    groups = {d.model_name for d in deployments}
    litellm = {
        k: _resolve_env(v, f"litellm_settings.{k}", environ)
        for k, v in _mapping(raw.get("litellm_settings"), "litellm_settings").items()
    }
    _warn_unknown(litellm, KNOWN_LITELLM_SETTINGS, "litellm_settings")
    router = _router_settings(raw.get("router_settings"), groups, environ)
    return RouterConfig(
        deployments=deployments,
        router=router,
        general=_general_settings(raw.get("general_settings"), environ),
        cache=_cache_settings(litellm, environ),
        drop_params=_bool(litellm.get("drop_params"), "litellm_settings.drop_params", False),
        callbacks=tuple(_str_list(litellm.get("callbacks"), "litellm_settings.callbacks")),
        source=source,
        complexity_routers=_complexity_routers(routers, groups, router.model_group_alias, environ),
    )


def _complexity_routers(
    entries: dict[int, dict[str, Any]],
    groups: set[str],
    aliases: dict[str, str],
    environ: dict[str, str],
) -> dict[str, TierRouterSettings]:
    """The `auto_router/complexity_router` entries, by model name."""
    out: dict[str, TierRouterSettings] = {}
    for i, entry in entries.items():
        path = f"model_list[{i}]"
        _warn_unknown(entry, KNOWN_MODEL_ENTRY, "model_list[]")
        name = entry.get("model_name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}.model_name: required, a non-empty string")
        if name in groups or name in out:
            raise ConfigError(f"{path}.model_name: {name!r} names a model group already")
        params = {
            k: _resolve_env(v, f"{path}.litellm_params.{k}", environ)
            for k, v in entry["litellm_params"].items()
        }
        try:
            out[name] = parse_router(
                name, params, f"{path}.litellm_params", groups, aliases, _warn_unknown
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out


def load_config(
    path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None
) -> RouterConfig:
    """Load `path`, or the built-in defaults when it is None."""
    if path is None:
        return parse_config(DEFAULT_CONFIG, environ=environ, source="<built-in defaults>")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return parse_config(raw or {}, environ=environ, source=str(p))


def default_config_path(cwd: str | os.PathLike[str] = ".") -> str | None:
    """`./config.yaml` when present, else None (the built-in defaults)."""
    candidate = Path(cwd) / "config.yaml"
    return str(candidate) if candidate.is_file() else None
