"""`mitmroute spend --what-if other.yaml`: past traffic re-priced under another config, from the
ledger's token counts alone."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import yaml

from mitmroute.config import parse_config
from mitmroute.exchange import Exchange, Usage
from mitmroute.money import whatif
from mitmroute.spend import SpendLog

MITMROUTE = str(Path(sys.executable).parent / "mitmroute")


def row(i: int, group: str, team: str, cost: str, **extra) -> Exchange:
    now = datetime.now(UTC)
    return Exchange(
        request_id=f"r{i}", started_at=now, ended_at=now, endpoint="chat/completions",
        requested_model=extra.pop("requested", group), model_group=group, team=team,
        status_code=200, usage=Usage(1000, 100), cost_usd=Decimal(cost), **extra,
    )  # fmt: skip


def ledger(path: Path) -> Path:
    log = SpendLog(str(path)).start()
    log.record(row(1, "gpt-4o", "a", "0.0035"))  # 1000 in at 2.5e-6, 100 out at 1e-5
    log.record(row(2, "gpt-4o", "b", "0.0035"))
    log.record(row(3, "claude", "a", "0.0045"))
    log.record(row(4, "gpt-4o", "a", "0", cache_hit=True))
    assert log.close()
    return path


OTHER = {
    "model_list": [
        {"model_name": "gpt-4o", "litellm_params": {"model": "ollama/qwen3:8b",
                                                    "api_base": "http://h:11434"}},
        {"model_name": "claude", "litellm_params": {"model": "openai/x", "api_base": "http://h/v1",
                                                    "input_cost_per_token": 0.000001,
                                                    "output_cost_per_token": 0.000002}},
    ]
}  # fmt: skip


def test_a_known_ledger_re_priced_under_another_config(tmp_path):
    db = ledger(tmp_path / "spend.duckdb")
    with duckdb.connect(str(db), read_only=True) as con:
        report = whatif.reprice(con, parse_config(OTHER), ["model_group"])
    gpt, claude = report.lines[("gpt-4o",)], report.lines[("claude",)]
    assert (gpt.rows, gpt.cost_now, gpt.cost_then) == (3, Decimal("0.007"), Decimal(0))
    assert claude.cost_then == Decimal("0.0012")  # 1000 * 1e-6 + 100 * 2e-6
    assert report.total.difference == Decimal("0.0012") - Decimal("0.0115")


def test_a_group_the_other_config_lacks_is_counted_apart_never_as_zero(tmp_path):
    db = ledger(tmp_path / "spend.duckdb")
    only_gpt = {"model_list": OTHER["model_list"][:1]}
    with duckdb.connect(str(db), read_only=True) as con:
        report = whatif.reprice(con, parse_config(only_gpt), ["team"])
    assert report.total.unplaced == 1 and report.total.cost_now == Decimal("0.007")


def test_the_command_prints_the_difference_per_group_team_and_day(tmp_path):
    db = ledger(tmp_path / "spend.duckdb")
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(OTHER))
    out = subprocess.run(
        [MITMROUTE, "spend", "--db", str(db), "--since", "all", "--by", "model,team,day",
         "--what-if", str(other)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "what_if_usd" in out and "difference_usd" in out
    assert "-0.010300" in out  # the total: 0.0012 instead of 0.0115


def test_a_routed_request_is_re_priced_at_the_other_configs_group_for_its_tier():
    router = {
        "model_name": "auto",
        "litellm_params": {
            "model": "auto_router/complexity_router",
            "complexity_router_default_model": "claude",
            "complexity_router_config": {
                "classifier_type": "heuristic",
                "tiers": {"SIMPLE": "gpt-4o", "MEDIUM": "gpt-4o", "COMPLEX": "claude",
                          "REASONING": "claude"},
            },
        },
    }  # fmt: skip
    repricer = whatif.Repricer(parse_config({"model_list": [*OTHER["model_list"], router]}))
    simple = repricer.deployment("auto", "claude", "SIMPLE")
    hard = repricer.deployment("auto", "gpt-4o", "COMPLEX")
    assert simple is not None and simple.model_name == "gpt-4o"
    assert hard is not None and hard.model_name == "claude"
    assert repricer.deployment("unknown", None, None) is None
