"""config.yaml: LiteLLM's schema loads unchanged; bad values name their key path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mitmroute.config import ConfigError, load_config, parse_config, parse_duration

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT.parent / "shared" / "seed"
SEED_ENV = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a", "LITELLM_MASTER_KEY": "sk-m"}


def seed_file(name: str) -> Path:
    local = ROOT / "tests" / "data" / name
    return local if local.exists() else SEED / name


def test_seed_basic_config_loads_unchanged():
    config = load_config(seed_file("litellm-basic.yaml"), environ={})
    groups = config.groups()
    assert list(groups) == ["gpt-4o", "claude-opus-4", "local-qwen"]
    assert groups["claude-opus-4"][0].provider == "anthropic"
    assert groups["claude-opus-4"][0].model == "claude-opus-4-20250514"
    assert groups["local-qwen"][0].api_base == "http://localhost:11434"
    assert config.router.fallbacks == {"gpt-4o": ["claude-opus-4", "local-qwen"]}
    assert config.general.master_key == "sk-proxy-your-secret-here"


def test_seed_production_config_loads_with_its_env_vars():
    config = load_config(seed_file("litellm-production.yaml"), environ=SEED_ENV)
    assert config.deployments[0].api_key == "sk-o"
    assert config.deployments[0].rpm == 500 and config.deployments[0].tpm == 300000
    assert config.router.fallbacks["claude-opus"] == ["claude-sonnet", "gpt-4o", "local-qwen-32b"]
    assert config.router.retry.num_retries == 2 and config.router.retry.retry_after == 5
    assert config.general.master_key == "sk-m" and config.general.max_budget == 500
    assert config.cache.enabled and config.cache.type == "redis" and config.cache.ttl == 300
    assert config.drop_params is True


def test_missing_env_var_names_the_key_path():
    with pytest.raises(
        ConfigError,
        match=r"model_list\[0\]\.litellm_params\.api_key: "
        r"environment variable OPENAI_API_KEY is not set",
    ):
        load_config(seed_file("litellm-production.yaml"), environ={})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {
                "model_list": [
                    {"model_name": "a", "litellm_params": {"model": "openai/x"}},
                    {"model_name": "b", "litellm_params": {"model": "openai/x"}},
                    {
                        "model_name": "c",
                        "litellm_params": {"model": "openai/x", "api_base": "nope"},
                    },
                ]
            },
            r"model_list\[2\]\.litellm_params\.api_base: not a URL",
        ),
        (
            {"model_list": [{"litellm_params": {"model": "openai/x"}}]},
            r"model_list\[0\]\.model_name: required",
        ),
        (
            {"model_list": [{"model_name": "a", "litellm_params": {"model": "madeup/x"}}]},
            r"model_list\[0\]\.litellm_params\.model: unknown provider 'madeup'",
        ),
        (
            {
                "model_list": [
                    {"model_name": "a", "litellm_params": {"model": "openai/x", "rpm": "lots"}}
                ]
            },
            r"model_list\[0\]\.litellm_params\.rpm: not a number",
        ),
        (
            {"router_settings": {"fallbacks": [{"a": ["ghost"]}]}},
            r"router_settings\.fallbacks\[0\]\.a: unknown model group",
        ),
        (
            {"litellm_settings": {"cache_params": {"type": "memcached"}}},
            r"litellm_settings\.cache_params\.type",
        ),
        (
            {"general_settings": {"budget_duration": "forever"}},
            r"general_settings\.budget_duration: not a duration",
        ),
    ],
)
def test_invalid_values_name_their_key_path(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, environ={})


def test_unknown_keys_warn_once(caplog):
    raw = {"general_settings": {"made_up_setting_xyz": 1}}
    with caplog.at_level(logging.WARNING):
        parse_config(raw, environ={})
        parse_config(raw, environ={})
    warnings = [r for r in caplog.records if "made_up_setting_xyz" in r.message]
    assert len(warnings) == 1


def test_retry_policy_per_error_class():
    config = parse_config(
        {
            "router_settings": {
                "num_retries": 1,
                "retry_policy": {"RateLimitErrorRetries": 4, "TimeoutErrorRetries": 0},
            }
        },
        environ={},
    )
    assert config.router.retry.num_retries == 1
    assert config.router.retry.per_error == {"RateLimitErrorRetries": 4, "TimeoutErrorRetries": 0}


def test_defaults_without_a_file():
    config = load_config(None)
    assert config.general.intercept_hosts == ("api.openai.com", "api.anthropic.com")
    assert config.general.spend_db == "./spend.duckdb"
    assert config.general.passthrough_unknown_models is True
    assert config.router.cooldown_time == 5.0


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("30m", 1800), ("24h", 86400), ("30d", 2592000), (15, 15)]
)
def test_durations(text, seconds):
    assert parse_duration(text, "x") == seconds


def test_deployment_id_and_public_base_are_fixed_at_load_without_credentials() -> None:
    """Computed once per deployment (they are read on every attempt), never holding the
    URL's userinfo or query; two entries differing in their key stay two deployments."""
    from mitmroute.config import Deployment

    raw = {
        "model_list": [
            {
                "model_name": "g",
                "litellm_params": {
                    "model": "openai/m",
                    "api_base": "https://user:pw@llm.example:8443/v1?token=s3cret",
                    "api_key": key,
                },
            }
            for key in ("sk-one", "sk-two")
        ]
    }
    first, second = parse_config(raw).deployments
    assert first.public_base == "https://llm.example:8443/v1"
    assert first.id == "openai/m@https://llm.example:8443/v1#0"
    assert second.id.endswith("#1") and first.id != second.id
    assert "pw" not in first.id and "s3cret" not in first.id
    made = Deployment("g", "openai", "m", "openai/m", "http://h/v1", index=3)
    assert (made.id, made.public_base) == ("openai/m@http://h/v1#3", "http://h/v1")
    assert made == Deployment("g", "openai", "m", "openai/m", "http://h/v1", index=3)


def test_a_deployments_repr_shows_no_credentials():
    raw = {
        "model_list": [
            {
                "model_name": "m",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": "https://user:pw-in-url@example.com/v1?key=q-secret",
                    "api_key": "sk-backend-secret",
                    "extra_headers": {"x-api-key": "hdr-secret"},
                },
            }
        ]
    }
    deployment = parse_config(raw, environ={}).deployments[0]
    assert deployment.api_key == "sk-backend-secret"  # still there for the upstream call
    assert "example.com" in repr(deployment)  # the public base says which backend it is
    text = repr(deployment) + str(deployment) + deployment.id + deployment.public_base
    for secret in ("sk-backend-secret", "hdr-secret", "pw-in-url", "q-secret"):
        assert secret not in text
