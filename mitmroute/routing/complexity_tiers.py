"""Complexity routers as config.yaml declares them: LiteLLM's `auto_router/complexity_router`.

A `model_list` entry whose `litellm_params.model` is ``auto_router/complexity_router`` is not a
deployment but a router: a request for its `model_name` goes to one of four tiers' model groups::

    - model_name: auto
      litellm_params:
        model: auto_router/complexity_router
        complexity_router_default_model: claude-opus     # unmapped tiers; the cost baseline
        complexity_router_config:
          classifier_type: heuristic
          tiers: {SIMPLE: local-qwen, MEDIUM: local-qwen, COMPLEX: claude-opus,
                  REASONING: claude-opus}

LiteLLM's names are read unchanged: `tiers`, `tier_boundaries`, `token_thresholds`,
`dimension_weights`, `code_keywords`, `reasoning_keywords`, `technical_keywords`,
`custom_technical_keywords`, `simple_keywords`, `keyword_tier_rules`, `escalation_keywords`,
`default_model`, `session_affinity_ttl_seconds`. mitmroute's own: `sticky_sessions`,
`session_headers`, `budget_step_down`, `max_scan_chars`. Any other key (LiteLLM's LLM classifier,
adaptive routing, plan mode, ...) warns once and is ignored; `classifier_type` other than
`heuristic` stops start-up, since routing silently by another method would mislead.

This module parses and holds settings only (config.py calls it); the per-request decision is
`complexity_router.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mitmroute.routing.complexity import (
    DEFAULT_BOUNDARIES,
    DEFAULT_CODE_KEYWORDS,
    DEFAULT_MAX_SCAN_CHARS,
    DEFAULT_REASONING_KEYWORDS,
    DEFAULT_SIMPLE_KEYWORDS,
    DEFAULT_TECHNICAL_KEYWORDS,
    DEFAULT_TOKEN_THRESHOLDS,
    DEFAULT_WEIGHTS,
    DIMENSIONS,
    TIERS,
    ClassifierSettings,
    Keywords,
    TierRule,
    keyword_list,
)

AUTO_ROUTER = "auto_router/complexity_router"
DEFAULT_SESSION_TTL = 3600.0
DEFAULT_SESSION_HEADERS = ("x-session-id", "session_id", "session-id", "x-claude-code-session-id")
"""Headers that name an agent's conversation: generic ones, Codex's `session-id`, Claude
Code's `x-claude-code-session-id`."""

KNOWN_KEYS = frozenset(
    {
        "classifier_type",
        "tiers",
        "tier_boundaries",
        "token_thresholds",
        "dimension_weights",
        "code_keywords",
        "reasoning_keywords",
        "technical_keywords",
        "custom_technical_keywords",
        "simple_keywords",
        "keyword_tier_rules",
        "escalation_keywords",
        "default_model",
        "session_affinity_ttl_seconds",
        # mitmroute's own
        "sticky_sessions",
        "session_headers",
        "budget_step_down",
        "max_scan_chars",
    }
)
KNOWN_PARAMS = frozenset({"model", "complexity_router_config", "complexity_router_default_model"})
BOUNDARY_KEYS = ("simple_medium", "medium_complex", "complex_reasoning")


@dataclass(frozen=True, slots=True)
class TierRouterSettings:
    """One `auto_router/complexity_router` entry, validated."""

    name: str
    groups: tuple[str, str, str, str]
    """The model group of each tier, SIMPLE to REASONING (unmapped tiers: the default model)."""
    baseline: str
    """What a request would have cost without the router: `complexity_router_default_model`,
    else the REASONING tier's group. `baseline_cost_usd` prices the same tokens there."""
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    sticky_sessions: bool = True
    session_ttl: float = DEFAULT_SESSION_TTL
    session_headers: tuple[str, ...] = DEFAULT_SESSION_HEADERS
    budget_step_down: tuple[float, ...] = ()
    """Shares of a key's budget: each one the key's spend has reached steps one tier down."""

    def step_down(self, tier: int, steps: int) -> int:
        """`tier` lowered `steps` times to the next tier served by another (cheaper) group."""
        for _ in range(steps):
            lower = next(
                (t for t in range(tier - 1, -1, -1) if self.groups[t] != self.groups[tier]),
                None,
            )
            if lower is None:
                break
            tier = lower
        return tier


def is_auto_router(params: Any) -> bool:
    """Is this `litellm_params` mapping a router rather than a deployment?"""
    model = params.get("model") if isinstance(params, dict) else None
    return isinstance(model, str) and model.startswith("auto_router/")


def parse_router(
    name: str,
    params: Mapping[str, Any],
    path: str,
    groups: set[str],
    aliases: Mapping[str, str],
    warn: Callable[[Mapping[str, Any], frozenset[str], str], None],
) -> TierRouterSettings:
    """Validate one router entry; raise ValueError whose message starts with the key path.
    `warn(section, known, path)` reports unknown keys."""
    if params.get("model") != AUTO_ROUTER:
        raise ValueError(
            f"{path}.model: only {AUTO_ROUTER} is supported of LiteLLM's auto routers, "
            f"got {params.get('model')!r}"
        )
    warn(params, KNOWN_PARAMS, "model_list[].litellm_params (auto_router)")
    cpath = f"{path}.complexity_router_config"
    raw = params.get("complexity_router_config")
    if not isinstance(raw, dict):
        raise ValueError(f"{cpath}: required, a mapping with `tiers`")
    warn(raw, KNOWN_KEYS, "complexity_router_config")
    classifier_type = raw.get("classifier_type", "heuristic")
    if classifier_type != "heuristic":
        raise ValueError(
            f"{cpath}.classifier_type: mitmroute classifies in-process only ('heuristic'), "
            f"got {classifier_type!r}"
        )

    def group(value: Any, where: str) -> str:
        if isinstance(value, list):
            raise ValueError(
                f"{where}: a list of models per tier is not supported; make one model group "
                "with several deployments (mitmroute spreads load across a group)"
            )
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: expected a model group name")
        resolved = aliases.get(value, value)
        if resolved not in groups:
            raise ValueError(f"{where}: unknown model group {value!r}")
        return resolved

    default = params.get("complexity_router_default_model") or raw.get("default_model")
    default_group = group(default, f"{path}.complexity_router_default_model") if default else None
    tiers = raw.get("tiers")
    if not isinstance(tiers, dict) or not tiers:
        raise ValueError(f"{cpath}.tiers: required, a mapping of SIMPLE/MEDIUM/COMPLEX/REASONING")
    mapped: list[str | None] = [None] * len(TIERS)
    for tier, value in tiers.items():
        key = str(tier).upper()
        if key not in TIERS:
            raise ValueError(f"{cpath}.tiers.{tier}: not a tier ({', '.join(TIERS)})")
        mapped[TIERS.index(key)] = group(value, f"{cpath}.tiers.{tier}")
    missing = [t for t, g in zip(TIERS, mapped, strict=True) if g is None]
    if missing and default_group is None:
        raise ValueError(
            f"{cpath}.tiers: {', '.join(missing)} not mapped; map every tier or set "
            "complexity_router_default_model"
        )
    final = tuple(g if g is not None else default_group for g in mapped)
    return TierRouterSettings(
        name=name,
        groups=final,  # type: ignore[arg-type]
        baseline=default_group or final[-1],  # type: ignore[arg-type]
        classifier=_classifier(raw, cpath),
        sticky_sessions=_bool(raw.get("sticky_sessions", True), f"{cpath}.sticky_sessions"),
        session_ttl=_positive(
            raw.get("session_affinity_ttl_seconds", DEFAULT_SESSION_TTL),
            f"{cpath}.session_affinity_ttl_seconds",
        ),
        session_headers=tuple(
            h.lower()
            for h in _strings(
                raw.get("session_headers", list(DEFAULT_SESSION_HEADERS)),
                f"{cpath}.session_headers",
            )
        ),
        budget_step_down=_shares(raw.get("budget_step_down"), f"{cpath}.budget_step_down"),
    )


def _classifier(raw: Mapping[str, Any], path: str) -> ClassifierSettings:
    weights = dict(DEFAULT_WEIGHTS)
    for dim, value in _mapping(raw.get("dimension_weights"), f"{path}.dimension_weights").items():
        if dim not in DIMENSIONS:
            raise ValueError(
                f"{path}.dimension_weights.{dim}: unknown dimension ({', '.join(DIMENSIONS)})"
            )
        weights[dim] = _number(value, f"{path}.dimension_weights.{dim}")
    bounds = dict(DEFAULT_BOUNDARIES)
    for key, value in _mapping(raw.get("tier_boundaries"), f"{path}.tier_boundaries").items():
        if key not in BOUNDARY_KEYS:
            raise ValueError(f"{path}.tier_boundaries.{key}: expected {', '.join(BOUNDARY_KEYS)}")
        bounds[key] = _number(value, f"{path}.tier_boundaries.{key}", minimum=None)
    b = tuple(bounds[k] for k in BOUNDARY_KEYS)
    if not b[0] < b[1] < b[2]:
        raise ValueError(f"{path}.tier_boundaries: must increase, got {list(b)}")
    thresholds = dict(DEFAULT_TOKEN_THRESHOLDS)
    for key, value in _mapping(raw.get("token_thresholds"), f"{path}.token_thresholds").items():
        if key not in thresholds:
            raise ValueError(f"{path}.token_thresholds.{key}: expected simple or complex")
        thresholds[key] = int(_number(value, f"{path}.token_thresholds.{key}"))
    if not 0 < thresholds["simple"] < thresholds["complex"]:
        raise ValueError(f"{path}.token_thresholds: need 0 < simple < complex")

    def words(key: str, default: tuple[str, ...], extra: str | None = None) -> Keywords:
        entries = default if raw.get(key) is None else _strings(raw[key], f"{path}.{key}")
        if extra is not None and raw.get(extra) is not None:
            entries = (*entries, *_strings(raw[extra], f"{path}.{extra}"))
        return Keywords.of(entries)

    rules = []
    for i, rule in enumerate(raw.get("keyword_tier_rules") or []):
        where = f"{path}.keyword_tier_rules[{i}]"
        rule = _mapping(rule, where)
        keywords = tuple(k.lower() for k in _strings(rule.get("keywords"), f"{where}.keywords"))
        keywords = tuple(k for k in (k.strip() for k in keywords) if k)
        tier = str(rule.get("tier", "")).upper()
        if not keywords or tier not in TIERS:
            raise ValueError(f"{where}: needs keywords and a tier ({', '.join(TIERS)})")
        rules.append(TierRule(keywords, TIERS.index(tier)))
    escalation = _strings(raw.get("escalation_keywords") or [], f"{path}.escalation_keywords")
    scan = raw.get("max_scan_chars", DEFAULT_MAX_SCAN_CHARS)
    return ClassifierSettings(
        weights=weights,
        boundaries=b,  # type: ignore[arg-type]
        token_thresholds=(thresholds["simple"], thresholds["complex"]),
        code=words("code_keywords", DEFAULT_CODE_KEYWORDS),
        reasoning=words("reasoning_keywords", DEFAULT_REASONING_KEYWORDS),
        technical=words(
            "technical_keywords", DEFAULT_TECHNICAL_KEYWORDS, "custom_technical_keywords"
        ),
        simple=words("simple_keywords", DEFAULT_SIMPLE_KEYWORDS),
        rules=tuple(rules),
        escalation=tuple(k.strip() for k in escalation if k.strip()),
        max_scan_chars=max(256, int(_number(scan, f"{path}.max_scan_chars"))),
    )


# --- value helpers (ValueError with the key path; config.py turns it into a ConfigError) -------


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a mapping")
    return value


def _number(value: Any, path: str, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: not a number: {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{path}: must be >= {minimum:g}, got {value}")
    return float(value)


def _positive(value: Any, path: str) -> float:
    number = _number(value, path)
    if number <= 0:
        raise ValueError(f"{path}: must be above 0, got {value}")
    return number


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{path}: not a boolean: {value!r}")
    return value


def _strings(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return keyword_list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: expected a list of strings")
    return tuple(value)


def _shares(value: Any, path: str) -> tuple[float, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    shares = []
    for i, v in enumerate(values):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        share = _number(v, where)
        if not 0 < share <= 1:
            raise ValueError(f"{where}: a share of the budget, above 0 and at most 1, got {v}")
        shares.append(share)
    return tuple(sorted(shares))
