"""The README's `mitmroute` command lines work exactly as written on a fresh clone after `make
test`: every line of a ```sh block that runs `.venv/bin/mitmroute` is run, in README order per
command, in a copy of the repository whose `.venv` is this test's virtualenv, with an empty HOME,
inside a network namespace of its own (so `mitmroute run` really gets :8080)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.cli.conftest import ROOT, clean_env
from tests.cli.netns import Namespace, namespace, stop

COMMANDS = ("run", "ca", "env", "spend", "keys", "doctor")


def readme_lines() -> list[str]:
    """The README's command lines that call `.venv/bin/mitmroute`, in order."""
    lines, language = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            language = line[3:].strip() if language is None else None
            continue
        if language == "sh" and re.match(r'(eval "\$\()?\.venv/bin/mitmroute ', line):
            lines.append(line)
    return lines


def command_of(line: str) -> str:
    words = shlex.split(line, comments=True)
    if words[0] == "eval":
        words = shlex.split(words[1].removeprefix("$(").removesuffix(")"))
    assert words[0] == ".venv/bin/mitmroute", line
    return words[1]


def test_the_readme_shows_every_command():
    shown = {command_of(line) for line in readme_lines()}
    assert shown == set(COMMANDS), shown


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The repository's files as a fresh clone has them, with `.venv` = this test's venv."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    clone = tmp_path / "clone"
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = clone / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return clone


class Shell:
    """Runs README lines in the clone, inside the namespace, with an empty HOME."""

    def __init__(self, ns: Namespace, clone: Path, home: Path) -> None:
        self.ns, self.clone, self.env = ns, clone, clean_env(HOME=str(home))
        self.home = home

    def run(self, line: str, then: str = "") -> subprocess.CompletedProcess[str]:
        # one command per line: a README line may end with a comment
        script = f"set -e\ncd {shlex.quote(str(self.clone))}\n{line}\n{then}"
        out = self.ns.shell(script, env=self.env)
        assert "Traceback" not in out.stderr, f"{line}\n{out.stderr}"
        return out

    def start(self, line: str) -> tuple[subprocess.Popen, int]:
        words = shlex.split(line, comments=True)
        port = int(words[words.index("-p") + 1]) if "-p" in words else 8080
        script = f"cd {shlex.quote(str(self.clone))}\nexec {line}"
        log = (self.home / f"run-{port}.log").open("wb")
        proc = subprocess.Popen(
            self.ns.argv("bash", "-c", script), env=self.env, stdout=log, stderr=log
        )
        try:
            self.ns.wait_for_port(port, proc)
        except Exception:
            stop(proc)
            raise AssertionError(f"{line}\n{(self.home / f'run-{port}.log').read_text()}") from None
        return proc, port

    def answered_by_mitmroute(self, line: str, port: int) -> int:
        """A request through the proxy `line` started is answered by mitmroute itself: the
        number of requests sent."""
        words = shlex.split(line, comments=True)
        if "transparent" in words:  # needs its iptables redirect: see test_transparent.py
            return 0
        if any(w.startswith("reverse:") for w in words):
            curl = f"curl -sS -D - -o /dev/null http://127.0.0.1:{port}/v1/models"
        else:
            ca = self.home / ".mitmproxy" / "mitmproxy-ca-cert.pem"
            curl = (
                f"curl -sS -D - -o /dev/null --proxy http://127.0.0.1:{port} --cacert {ca} "
                "https://api.openai.com/v1/models"
            )
        out = self.ns.shell(curl, env=self.env, timeout=30)
        assert out.returncode == 0 and "x-mitmroute-request-id" in out.stdout, (line, out)
        return 1


def test_readme_command_lines_work_on_a_fresh_clone(clone, tmp_path):
    lines = readme_lines()
    by_command = {c: [ln for ln in lines if command_of(ln) == c] for c in COMMANDS}
    assert sum(map(len, by_command.values())) == len(lines)
    home = tmp_path / "home"
    home.mkdir()
    with namespace("mr-readme") as ns:
        shell = Shell(ns, clone, home)
        # The proxy, each way the README starts it: listening, answering, stopped cleanly (its
        # requests are the spend rows the spend lines read).
        requests = 0
        for line in by_command["run"]:
            proc, port = shell.start(line)
            try:
                requests += shell.answered_by_mitmroute(line, port)
            finally:
                stop(proc)
            assert proc.returncode == 0, line
        for line in by_command["ca"]:
            out = shell.run(line)
            assert out.returncode == 0, (line, out.stderr)
            assert (clone / "mitmroute-ca.pem").is_file()
        for line in by_command["env"]:
            out = shell.run(line, then='test -f "$SSL_CERT_FILE" && echo "$HTTPS_PROXY"')
            assert out.returncode == 0 and out.stdout.strip() == "http://127.0.0.1:8080", out
        for line in by_command["spend"]:
            out = shell.run(line)
            assert out.returncode == 0 and "no requests" not in out.stdout, (line, out)
            assert "spend: config " in out.stderr  # it says which config gave it the db
        with duckdb.connect(str(clone / "week.parquet").replace(".parquet", ".check")) as con:
            rows = con.execute(f"select count(*) from '{clone / 'week.parquet'}'").fetchone()
        assert rows[0] >= requests > 0
        for line in by_command["keys"]:
            out = shell.run(line)
            assert out.returncode == 0, (line, out.stderr)
            assert json.loads(out.stdout)["key"].startswith("sk-")
        proc, _ = shell.start(by_command["run"][0])
        try:
            for line in by_command["doctor"]:
                out = shell.run(line)
                # the example config's backends (Ollama, Anthropic, vLLM) aren't running here
                assert out.returncode == 1, (line, out)
                assert re.search(r"^proxy +ok ", out.stdout, re.M), out.stdout
                assert "broken: gpt-4o (ollama_chat/qwen3:8b" in out.stderr.splitlines()[-1]
        finally:
            stop(proc)
