#!/usr/bin/env python3
"""Instructions per call of one piece of the hot path, A/B between checkouts (callgrind).

    .venv/bin/python scripts/callgrind_micro.py CASE [--root DIR] [--calls N]

Runs the case N times and 0 times under `valgrind --tool=callgrind` (same hash seed) and
prints the difference divided by N: the instructions one call costs, repeatable to ~0.1% on
a busy machine. `--root` imports mitmroute from another checkout (e.g. the commit before a
change). Cases: encode (one SSE chunk), price (one request's cost), client_request (a flow's
engine view), new_exchange, decide (the gate's path decision), stream_chunk (one chunk
parsed, assembled and re-encoded).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [{"index": 0, "delta": {"content": "echo the quick fox"}, "finish_reason": None}],
}


def _flow() -> Any:
    from mitmproxy import http
    from mitmproxy.test import tflow

    flow = tflow.tflow()
    flow.request = http.Request.make(
        "POST",
        "https://api.openai.com/v1/chat/completions",
        json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}),
        {
            "Host": "api.openai.com",
            "Accept": "*/*",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": "Python/3.13 aiohttp/3.11",
            "Content-Type": "application/json",
            "Authorization": "Bearer sk-profile-0123456789abcdef",
        },
    )
    return flow


def case_encode() -> Callable[[], Any]:
    from mitmroute.streaming.sse import encode

    return lambda: encode(CHUNK)


def case_price() -> Callable[[], Any]:
    import yaml

    from mitmroute.config import load_config
    from mitmroute.exchange import Usage
    from mitmroute.money import Pricing

    path = Path(tempfile.mkdtemp()) / "config.yaml"
    litellm = {"model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1"}
    path.write_text(
        yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": litellm}]})
    )
    config = load_config(str(path))
    pricing, deployment = Pricing.for_config(config), config.deployments[0]
    usage = Usage(prompt_tokens=12, completion_tokens=7)
    return lambda: pricing.cost(deployment.provider, deployment.model, usage, deployment)


def case_client_request() -> Callable[[], Any]:
    from mitmroute.addons import flows

    flow = _flow()
    return lambda: flows.client_request(flow)


def case_new_exchange() -> Callable[[], Any]:
    from mitmroute.addons import flows
    from mitmroute.request import new_exchange

    request = flows.client_request(_flow())
    return lambda: new_exchange(request, "chat/completions")


def case_decide() -> Callable[[], Any]:
    from mitmroute.gate import decide

    return lambda: decide("POST", "/v1/chat/completions", "api.openai.com")


def case_stream_chunk() -> Callable[[], Any]:
    from mitmroute.providers.openai import OpenAIStream
    from mitmroute.streaming.pipe import _render
    from mitmroute.streaming.sse import ChunkAssembler

    data = b"data: " + json.dumps(CHUNK).encode() + b"\n\n"
    stream = OpenAIStream("openai")
    # _render takes the translator since it passes unchanged chunks' bytes on as they came
    more = (stream,) if "translator" in inspect.signature(_render).parameters else ()
    return lambda: _render(stream.feed(data), ChunkAssembler(), False, *more)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def counted(case: str, root: Path, calls: int) -> int:
    """Instructions of a whole run of `calls` calls (start-up included)."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                __file__,
                case,
                "--root",
                str(root),
                "--calls",
                str(calls),
                "--run",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout to import from")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # inside valgrind
    args = p.parse_args()
    if args.run:
        sys.path.insert(0, str(args.root))
        fn = CASES[args.case]()
        for _ in range(args.calls):
            fn()
        return 0
    per_call = counted(args.case, args.root, args.calls) - counted(args.case, args.root, 0)
    print(f"{args.case} {args.root}: {per_call / args.calls:,.0f} instructions per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
