"""Transparent mode: an app that ignores every proxy setting, in a network namespace of its own,
is routed by mitmroute all the same (the README's recipe, `mitmroute run --mode transparent`).

The "host" of the recipe is a second namespace here, so no rule touches the machine's own
network: app namespace --veth--> proxy namespace, where an iptables REDIRECT sends port 443 to
the transparent proxy, and a fake backend answers on the proxy namespace's loopback.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import yaml

from tests.cli.conftest import MITMROUTE, ROOT, clean_env
from tests.cli.netns import ensure_iptables, ip, namespace, stop
from tests.conftest import deployment

PROXY_ADDR, APP_ADDR = "10.99.0.1", "10.99.0.2"
PROXY_PORT, BACKEND_PORT = 8443, 18777

APP = """
import json, sys
import httpx2, openai
# Ignores every proxy setting: trust_env=False (HTTPS_PROXY in its env points nowhere).
http = httpx2.Client(trust_env=False, verify=sys.argv[1])
client = openai.OpenAI(api_key="sk-app", http_client=http, max_retries=0)
messages = [{"role": "user", "content": "hello transparent"}]
raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
stream = client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
print(json.dumps({"plain": raw.parse().choices[0].message.content, "streamed": streamed,
                  "deployment": raw.headers["x-mitmroute-deployment"]}))
"""


def test_an_app_that_ignores_proxy_settings_is_routed_in_transparent_mode(tmp_path):
    ensure_iptables()
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), PYTHONPATH=str(ROOT))
    config = {
        "model_list": [
            deployment("gpt-4o", "openai/ok-model", f"http://127.0.0.1:{BACKEND_PORT}/v1")
        ],
        "general_settings": {"spend_db": str(tmp_path / "spend.duckdb")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    veth = f"mr{uuid.uuid4().hex[:6]}"
    with namespace("mr-tproxy") as proxy_ns, namespace("mr-tapp") as app_ns:
        # The recipe: a veth pair, the app's api.openai.com at the proxy's side of it, and
        # port 443 arriving there redirected to the transparent proxy.
        pair = ["link", "add", f"{veth}p", "type", "veth", "peer", f"{veth}a", "netns", app_ns.name]
        ip("-n", proxy_ns.name, *pair)
        ip("-n", proxy_ns.name, "addr", "add", f"{PROXY_ADDR}/30", "dev", f"{veth}p")
        ip("-n", app_ns.name, "addr", "add", f"{APP_ADDR}/30", "dev", f"{veth}a")
        ip("-n", proxy_ns.name, "link", "set", f"{veth}p", "up")
        ip("-n", app_ns.name, "link", "set", f"{veth}a", "up")
        hosts = Path("/etc/netns") / app_ns.name / "hosts"
        hosts.parent.mkdir(parents=True)
        hosts.write_text(f"127.0.0.1 localhost\n{PROXY_ADDR} api.openai.com\n")
        redirect = f"iptables -t nat -A PREROUTING -i {veth}p -p tcp --dport 443 -j REDIRECT"
        assert proxy_ns.shell(f"{redirect} --to-port {PROXY_PORT}").returncode == 0

        fake = [
            sys.executable,
            str(ROOT / "tests/fakes/openai_server.py"),
            "--port",
            str(BACKEND_PORT),
        ]
        backend = subprocess.Popen(proxy_ns.argv(*fake), env=env, stderr=subprocess.DEVNULL)
        run = [MITMROUTE, "run", "--config", str(tmp_path / "config.yaml"), "--mode", "transparent"]
        run += ["-p", str(PROXY_PORT)]
        log = (tmp_path / "mitmdump.log").open("wb")
        proxy = subprocess.Popen(proxy_ns.argv(*run), env=env, stdout=log, stderr=log, cwd=tmp_path)
        try:
            proxy_ns.wait_for_port(BACKEND_PORT, backend)
            proxy_ns.wait_for_port(PROXY_PORT, proxy)
            ca = [MITMROUTE, "ca", "--out", str(tmp_path / "bundle.pem")]
            subprocess.run(ca, env=env, check=True, capture_output=True)
            app = app_ns.shell(
                f"HTTPS_PROXY=http://127.0.0.1:9 {shlex.quote(sys.executable)} -c "
                f"{shlex.quote(APP)} {tmp_path / 'bundle.pem'}",
                env=env,
                timeout=60,
            )
            assert app.returncode == 0, app.stderr + (tmp_path / "mitmdump.log").read_text()
            assert json.loads(app.stdout) == {
                "plain": "echo: hello transparent",
                "streamed": "echo: hello transparent",
                "deployment": "openai/ok-model",
            }
        finally:
            stop(proxy)
            stop(backend)
            log.close()
    with duckdb.connect(str(tmp_path / "spend.duckdb"), read_only=True) as con:
        rows = con.execute("select deployment, status_code from spend_log").fetchall()
    assert rows == [("openai/ok-model", 200)] * 2
