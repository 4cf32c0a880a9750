"""The seed's production config (tests/data/litellm-production.yaml) on three proxies behind
HAProxy: one ledger that `mitmroute spend --config` reads, one set of virtual keys.

Only what names the seed's own machines changes: `database_url` and the Redis host point at
this machine's servers (a database and a namespace of the test's own), each deployment gets the
`api_base` of a fake backend, and `spend_data_path` names the one directory of Parquet files
every proxy reaches (the README's recipe for many proxies)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fleet import Fleet

ENV = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a", "LITELLM_MASTER_KEY": "sk-m-seed"}


@pytest.fixture
def claude():
    with FakeAnthropic(api_key=ENV["ANTHROPIC_API_KEY"]) as server:
        yield server


def production_config(
    pg_url: str, namespace: str, data_path: Path, bases: tuple[str, str, str]
) -> dict[str, Any]:
    openai_url, anthropic_url, ollama_url = bases
    config = yaml.safe_load((ROOT / "tests" / "data" / "litellm-production.yaml").read_text())
    bases = {"openai": openai_url, "anthropic": anthropic_url, "ollama": ollama_url}
    for model in config["model_list"]:
        params = model["litellm_params"]
        params["api_base"] = bases[params["model"].split("/", 1)[0]]
    config["general_settings"]["database_url"] = pg_url
    config["general_settings"]["spend_data_path"] = str(data_path)
    cache = config["litellm_settings"]["cache_params"]
    cache["host"] = "127.0.0.1"
    cache["namespace"] = namespace
    return config


def test_the_seed_production_config_on_three_proxies_writes_one_ledger(
    backend, claude, pg_url, redis_namespace, confdir, tmp_path
):
    data_path = tmp_path / "spend-data"
    bases = (f"{backend.url}/v1", claude.base_url, backend.url)
    config = production_config(pg_url, redis_namespace, data_path, bases)
    fleet = Fleet(config, 3, confdir, tmp_path / "fleet", env=ENV)
    fleet.start()
    try:
        with fleet.http() as http:
            made = http.post(
                "https://api.openai.com/key/generate",
                headers={"authorization": f"Bearer {ENV['LITELLM_MASTER_KEY']}"},
                json={"key_alias": "seed-app"},
            )
        assert made.status_code == 200, made.text
        key = made.json()["key"]
        tag = uuid.uuid4().hex[:8]
        answered = 0
        # through the balancer and each proxy directly, on both providers of the seed
        for proxy in [fleet, *fleet.instances]:
            with proxy.client(api_key=key) as client:
                for model in ("gpt-4o", "claude-sonnet"):
                    done = client.chat.completions.create(
                        model=model, user=tag, messages=[{"role": "user", "content": "hello"}]
                    )
                    assert done.choices[0].message.content
                    answered += 1
    finally:
        codes = fleet.stop()
    assert codes == [0, 0, 0]

    out = subprocess.run(
        [sys.executable, "-m", "mitmroute.cli", "spend", "--config", str(fleet.config_path),
         "--since", "all", "--sql",
         f"select count(*), count(distinct request_id), any_value(key_alias) "
         f"from spend_log where \"user\" = '{tag}'"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **ENV},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[2].split() == [str(answered), str(answered), "seed-app"]
