"""Every command finds its config the same way (--config, $MITMROUTE_CONFIG, ./config.yaml, the
example) and says on stderr which one it used."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mitmroute.cli.configs import EXAMPLE, find_config
from tests.cli.conftest import clean_env, mitmroute, one_line_error


def write_config(path: Path, spend_db: Path) -> Path:
    path.write_text(
        yaml.safe_dump({"model_list": [], "general_settings": {"spend_db": str(spend_db)}})
    )
    return path


def test_search_order_flag_then_variable_then_cwd_then_example(tmp_path, monkeypatch):
    monkeypatch.delenv("MITMROUTE_CONFIG", raising=False)
    assert find_config(None, cwd=tmp_path).path == EXAMPLE
    (tmp_path / "config.yaml").write_text("model_list: []\n")
    assert find_config(None, cwd=tmp_path).path == tmp_path / "config.yaml"
    monkeypatch.setenv("MITMROUTE_CONFIG", "from-env.yaml")
    assert find_config(None, cwd=tmp_path).path == Path("from-env.yaml")
    chosen = find_config("from-flag.yaml", cwd=tmp_path)
    assert chosen.path == Path("from-flag.yaml") and chosen.reason == "--config"


COMMANDS = {
    "spend": ["spend"],
    "keys": ["keys", "list"],
    "doctor": ["doctor", "--no-proxy"],
    "run": ["run", "--version"],
}


@pytest.mark.parametrize("how", ["--config", "MITMROUTE_CONFIG", "./config.yaml", "example"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_finds_the_config_the_same_way_and_says_which(command, how, workdir):
    env = clean_env()
    args = list(COMMANDS[command])
    if how == "--config":
        expected = write_config(workdir / "flag.yaml", workdir / "flag.duckdb")
        args[1:1] = ["--config", str(expected)] if command != "keys" else []
        if command == "keys":
            args = ["keys", "--config", str(expected), "list"]
        reason = "--config"
    elif how == "MITMROUTE_CONFIG":
        expected = write_config(workdir / "env.yaml", workdir / "env.duckdb")
        env["MITMROUTE_CONFIG"] = str(expected)
        reason = "$MITMROUTE_CONFIG"
    elif how == "./config.yaml":
        write_config(workdir / "config.yaml", workdir / "cwd.duckdb")
        expected, reason = Path("config.yaml"), "./config.yaml"
    else:
        expected, reason = EXAMPLE, "the example, as there is no ./config.yaml"
    out = mitmroute(*args, cwd=workdir, env=env)
    said = f"mitmroute {command}: config {expected} ({reason})"
    assert out.stderr.splitlines()[0] == said, out.stderr
    if command == "spend":  # the database is the chosen config's spend_db
        db = {"--config": "flag.duckdb", "MITMROUTE_CONFIG": "env.duckdb"}.get(how)
        assert (db or (".duckdb")) in one_line_error(out, "spend")
        if how == "./config.yaml":
            assert str(workdir / "cwd.duckdb") in out.stderr
    elif command == "keys":
        assert out.returncode == 0, out.stderr
    elif command == "doctor":
        assert "config  ok" in out.stdout, out.stdout
    else:
        assert out.returncode == 0 and "Mitmproxy:" in out.stdout, out.stderr


def test_a_missing_config_named_by_the_variable_is_an_error_not_a_fallback(workdir):
    env = clean_env(MITMROUTE_CONFIG=str(workdir / "gone.yaml"))
    line = one_line_error(mitmroute("spend", cwd=workdir, env=env), "spend")
    assert "gone.yaml: cannot read" in line
