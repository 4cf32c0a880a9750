"""The README's CA table for Python clients that need more than HTTPS_PROXY: aiohttp goes
through the proxy with `trust_env=True` and the environment of `mitmroute env` (its default
SSL context reads SSL_CERT_FILE), and ignores HTTPS_PROXY without it."""

from __future__ import annotations

import shlex
import subprocess
import sys

from tests.cli.conftest import MITMROUTE, clean_env
from tests.conftest import deployment

APP = """
import asyncio, sys, aiohttp
async def main():
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello aiohttp"}]}
    async with aiohttp.ClientSession(trust_env=sys.argv[1] == "trust_env") as session:
        async with session.post("https://api.openai.com/v1/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=10)) as r:
            print((await r.json())["choices"][0]["message"]["content"])
asyncio.run(main())
"""


def run(proxy_url: str, confdir, mode: str) -> subprocess.CompletedProcess[str]:
    setup = f'eval "$({MITMROUTE} env --proxy {proxy_url} --confdir {confdir})"'
    script = f"{setup} && {shlex.quote(sys.executable)} -c {shlex.quote(APP)} {mode}"
    return subprocess.run(
        ["bash", "-c", script], env=clean_env(), capture_output=True, text=True, timeout=60
    )


def test_aiohttp_needs_trust_env_to_use_the_proxy(start_proxy, backend, confdir):
    proxy = start_proxy(
        {"model_list": [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1")]}
    )
    routed = run(proxy.url, confdir, "trust_env")
    assert routed.returncode == 0 and routed.stdout.strip() == "echo: hello aiohttp", routed.stderr
    direct = run(proxy.url, confdir, "default")  # straight to api.openai.com: unreachable here
    assert direct.returncode != 0 and "echo" not in direct.stdout
