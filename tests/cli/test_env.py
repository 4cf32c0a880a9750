"""`mitmroute env` prints the environment an app's shell needs, one assignment per line."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import certifi

from mitmroute.cli.env import PRELOAD
from tests.cli.conftest import MITMROUTE, clean_env, mitmroute

NAMES = [
    "HTTPS_PROXY",
    "https_proxy",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "NODE_USE_ENV_PROXY",
    "NODE_OPTIONS",
]


def exported(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        assert line.startswith("export "), line
        name, _, value = line.removeprefix("export ").partition("=")
        (out[name],) = shlex.split(value)
    return out


def test_sh_lines_name_the_proxy_the_ca_bundle_and_node(tmp_path):
    confdir = tmp_path / "conf"
    out = mitmroute("env", "--proxy", "http://127.0.0.1:9999", "--confdir", str(confdir))
    assert out.returncode == 0, out.stderr
    env = exported(out.stdout)
    assert list(env) == NAMES
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:9999"
    ca = (confdir / "mitmproxy-ca-cert.pem").read_text()  # created on the way
    assert env["NODE_EXTRA_CA_CERTS"] == str(confdir / "mitmproxy-ca-cert.pem")
    bundle = Path(env["SSL_CERT_FILE"])
    assert env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"] == str(bundle)
    text = bundle.read_text()
    assert text.endswith(ca) and Path(certifi.where()).read_text().strip() in text
    assert env["NODE_USE_ENV_PROXY"] == "1"
    assert env["NODE_OPTIONS"] == f"--require {PRELOAD}" and PRELOAD.is_file()


def test_eval_in_a_shell_sets_everything_and_keeps_node_options(tmp_path):
    setup = f'eval "$({MITMROUTE} env --confdir {tmp_path})"'
    dump = 'python3 -c "import json, os; print(json.dumps(dict(os.environ)))"'
    script = f"{setup} && {setup} && {dump}"
    env = clean_env(NODE_OPTIONS="--max-old-space-size=512")
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["HTTPS_PROXY"] == "http://127.0.0.1:8080"  # where `mitmroute run` listens
    assert seen["NODE_OPTIONS"] == f"--max-old-space-size=512 --require {PRELOAD}"  # once
    assert all(name in seen for name in NAMES)


def test_fish_and_powershell_syntax(tmp_path):
    fish = mitmroute("env", "--shell", "fish", "--confdir", str(tmp_path)).stdout.splitlines()
    assert fish[0] == "set -gx HTTPS_PROXY 'http://127.0.0.1:8080'" and len(fish) == len(NAMES)
    ps = mitmroute("env", "--shell", "powershell", "--confdir", str(tmp_path)).stdout.splitlines()
    assert ps[0] == "$env:HTTPS_PROXY = 'http://127.0.0.1:8080'" and len(ps) == len(NAMES)
    assert ps[-1] == f"$env:NODE_OPTIONS = '--require {PRELOAD}'"


def test_a_confdir_with_a_space_is_quoted_for_the_shell_and_for_node(tmp_path):
    confdir = tmp_path / "my conf"
    out = mitmroute("env", "--confdir", str(confdir))
    env = exported(out.stdout)
    assert env["SSL_CERT_FILE"] == str(confdir / "mitmroute-ca-bundle.pem")
    assert Path(env["SSL_CERT_FILE"]).is_file()
