"""Errors are one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import duckdb
import pytest

from tests.cli.conftest import mitmroute, one_line_error


@pytest.fixture
def spend_db(workdir):
    db = workdir / "spend.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("create table spend_log as select 'gpt-4o' as model_group, 1.5 as cost_usd")
    return db


def test_a_sql_typo_is_one_line_naming_the_error(spend_db):
    out = mitmroute("spend", "--db", str(spend_db), "--sql", "selec * from spend_log")
    line = one_line_error(out, "spend")
    assert "SQL error" in line and "syntax error" in line, line


def test_sql_that_writes_is_refused_in_one_line(spend_db):
    out = mitmroute("spend", "--db", str(spend_db), "--sql", "drop table spend_log")
    assert "read-only" in one_line_error(out, "spend")


def test_a_missing_table_is_one_line(spend_db):
    out = mitmroute("spend", "--db", str(spend_db), "--sql", "select * from nope")
    assert "nope" in one_line_error(out, "spend")


def test_sql_results_print_as_a_table(spend_db):
    out = mitmroute(
        "spend", "--db", str(spend_db), "--sql", "select model_group, cost_usd from spend_log"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[2].split() == ["gpt-4o", "1.500000"]


def test_a_bad_config_names_its_key_in_one_line(workdir):
    (workdir / "config.yaml").write_text(
        "model_list:\n  - model_name: x\n    litellm_params: {model: nope/x}\n"
    )
    for args in (["run"], ["spend"], ["keys", "list"]):
        line = one_line_error(mitmroute(*args, cwd=workdir), args[0])
        assert "model_list[0].litellm_params.model: unknown provider 'nope'" in line, line


def test_a_bad_config_is_a_failed_check_for_the_doctor(workdir, confdir):
    (workdir / "config.yaml").write_text("model_list: 5\n")
    out = mitmroute("doctor", "--no-proxy", "--confdir", str(confdir), cwd=workdir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "config  FAIL" in out.stdout and "model_list: expected a list" in out.stdout
    assert out.stderr.splitlines()[-1] == "mitmroute doctor: broken: config"


def test_usage_errors_exit_2(workdir):
    assert mitmroute("spend", "--db", "x.duckdb", "--by", "colour").returncode == 2
    assert mitmroute("spend", "--db", "x.duckdb", "--since", "soon").returncode == 2
    assert mitmroute("env", "--proxy", "ftp://x").returncode == 2
    assert mitmroute("nope").returncode == 2
    out = mitmroute("keys", "generate", "--metadata", "{not json", cwd=workdir)
    assert "--metadata: not JSON" in one_line_error(out, "keys")


def test_a_missing_spend_database_says_when_it_appears(workdir):
    line = one_line_error(mitmroute("spend", "--db", str(workdir / "none.duckdb")), "spend")
    assert "no spend database at" in line


def test_run_refuses_a_router_config_given_twice(workdir):
    out = mitmroute("run", "--set", "router_config=x.yaml", cwd=workdir)
    assert "--config" in one_line_error(out, "run") and out.returncode == 2
