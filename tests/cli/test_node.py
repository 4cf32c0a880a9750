"""An unchanged Node app using the openai npm package (v6: Node's built-in fetch) is answered
through the proxy with nothing but `eval "$(mitmroute env ...)"` in its shell, on Node 20."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.cli.conftest import MITMROUTE, clean_env
from tests.conftest import deployment

APP = Path(__file__).with_name("node_app.cjs")


def run_app(node_dir: Path, shell_setup: str, text: str) -> subprocess.CompletedProcess[str]:
    """The app in a shell that did `shell_setup`, from a directory with the openai package."""
    shutil.copy(APP, node_dir / "app.cjs")
    env = clean_env(OPENAI_API_KEY="sk-node-app-key")
    script = f'{shell_setup} && exec node app.cjs "{text}"'
    return subprocess.run(
        ["bash", "-c", script], cwd=node_dir, env=env, capture_output=True, text=True, timeout=60
    )


def test_node_fetch_app_goes_through_the_proxy_with_mitmroute_env_alone(
    start_proxy, backend, node_openai, confdir
):
    proxy = start_proxy(
        {"model_list": [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1")]}
    )
    setup = f'eval "$({MITMROUTE} env --proxy {proxy.url} --confdir {confdir})"'
    out = run_app(node_openai, setup, "hello node")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        '{"plain":"echo: hello node"}',
        '{"streamed":"echo: hello node"}',
    ]
    sent = [r for r in backend.state.requests if "hello node" in str(r.get("messages"))]
    assert [r["model"] for r in sent] == ["ok-model", "ok-model"]  # routed by the proxy
    assert sent[1]["stream"] is True


def test_without_the_preload_node_fetch_ignores_https_proxy(
    start_proxy, backend, node_openai, confdir
):
    """Why `mitmroute env` sets NODE_OPTIONS: on Node 20, HTTPS_PROXY alone is not enough."""
    proxy = start_proxy(
        {"model_list": [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1")]}
    )
    ca = confdir / "mitmproxy-ca-cert.pem"
    setup = f"export HTTPS_PROXY={proxy.url} NODE_EXTRA_CA_CERTS={ca}"
    out = run_app(node_openai, setup, "hello bypass")
    assert out.returncode == 1 and "app failed" in out.stderr  # went for api.openai.com itself
    assert not [r for r in backend.state.requests if "hello bypass" in str(r.get("messages"))]


def test_no_proxy_and_unset_variables_leave_node_fetch_direct(tmp_path):
    """The preload only tunnels what the variables say: NO_PROXY hosts and no proxy at all go
    direct (here to a local server that answers)."""
    from mitmroute.cli.env import PRELOAD

    serve = "require('http').createServer((q, s) => s.end('direct')).listen(0, function () {"
    serve += " console.log(this.address().port) })"
    server = subprocess.Popen(["node", "-e", serve], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        code = f"fetch('http://127.0.0.1:{port}/').then(r => r.text()).then(console.log)"
        for extra in ({}, {"HTTP_PROXY": "http://127.0.0.1:1", "NO_PROXY": "127.0.0.1"}):
            env = clean_env(NODE_OPTIONS=f"--require {PRELOAD}", **extra)
            out = subprocess.run(["node", "-e", code], env=env, capture_output=True, text=True)
            assert out.stdout.strip() == "direct", out.stderr
        env = clean_env(NODE_OPTIONS=f"--require {PRELOAD}", HTTP_PROXY="http://127.0.0.1:1")
        out = subprocess.run(["node", "-e", code], env=env, capture_output=True, text=True)
        assert "ECONNREFUSED 127.0.0.1:1" in out.stderr  # tunnelled: to the (dead) proxy
    finally:
        server.kill()
        server.wait()
