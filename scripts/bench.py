#!/usr/bin/env python3
"""Benchmark mitmroute against bare mitmdump, a direct connection and (optionally) LiteLLM.

    .venv/bin/python scripts/bench.py [--requests N] [--soak N] [--rounds R] [--smoke]
                                      [--out DIR] [--litellm-python /venv/bin/python]
                                      [--only SCENARIO] [--streams N] [--chunks N] [--gap-ms MS]

One run starts a fast fake OpenAI backend, mitmroute (plain, with a local cache, with a Redis
cache), a bare mitmdump that only rewrites the host (scripts/bench_rewrite_addon.py) and LiteLLM
when its python can import `litellm.proxy`; drives the same closed-loop load through each, with
targets interleaved over several rounds; then holds `--streams` concurrent streams of
timestamped chunks through each (the `streams` scenario); and writes `latest.json`, `latest.md`
and `latest.png` to `--out` (default bench-results/). Every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = str(Path(sys.executable).parent / "mitmdump")
QUIET = ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]  # same for every mitmdump
KEY = "sk-bench-5f0e2c7a9b4d6e8f1a3c5e7b9d2f4a6c"  # LiteLLM's master key; mitmroute replaces it
PROXIED = {"bare", "mitmroute", "mr-cache-local", "mr-cache-redis"}
ORDER = ["direct", "bare", "mitmroute", "mr-cache-local", "mr-cache-redis", "litellm"]
# The rest keeps a compact hand layout, as the repo's `# fmt: skip` statements do.
# fmt: off


# --- 1. the fake backend (a subprocess: `bench.py --serve-fake PORT`) -------------------------


class FakeOpenAI(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 server for POST /v1/chat/completions (JSON or SSE)."""

    gap = 0.001  # seconds between streamed chunks, so time-to-first-chunk means something

    def connection_made(self, transport: Any) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head[1:]
                           if h.lower().startswith("content-length:")), 0)
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + length], self.buf[end + 4 + length :]
            self.answer(head[0].split(" ")[1], body)

    def send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.transport.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%b" % (status, len(data), data))

    def answer(self, path: str, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        model = str(body.get("model", ""))
        if not path.endswith("/chat/completions"):
            return self.send(404, {"error": {"message": "not found", "type": "invalid_request"}})
        if model.startswith("fail-"):
            return self.send(500, {"error": {"message": "fake failure", "type": "server_error"}})
        base = {"id": f"chatcmpl-{secrets.token_hex(6)}", "created": int(time.time()),
                "model": model}
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        if body.get("stream") and (ticks := TICKS.fullmatch(model)):
            return self.tick_stream(base, int(ticks[1]), float(ticks[2]) / 1000,
                                    bool((body.get("stream_options") or {}).get("include_usage")))
        if not body.get("stream"):
            message = {"role": "assistant", "content": "echo: the quick fox"}
            return self.send(200, {**base, "object": "chat.completion", "usage": usage,
                                   "choices": [{"index": 0, "message": message,
                                                "finish_reason": "stop"}]})
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        deltas = [{"role": "assistant", "content": ""}, {"content": "echo:"},
                  {"content": " the"}, {"content": " quick"}, {"content": " fox"}, {}]
        events = [{**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": d, "finish_reason": None if d else "stop"}]} for d in deltas]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage})
        frames = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
        loop = asyncio.get_running_loop()
        for i, frame in enumerate([*frames, b"data: [DONE]\n\n", b""]):
            chunk = b"%x\r\n%b\r\n" % (len(frame), frame)
            loop.call_later(i * self.gap, self.transport.write, chunk)


    def tick_stream(self, base: dict[str, Any], chunks: int, gap: float, usage: bool) -> None:
        """`chunks` chunks `gap` s apart on a fixed schedule, each saying `<seq> <due> <sent> `.

        due and sent are CLOCK_MONOTONIC nanoseconds (time.monotonic_ns(), the same clock in
        every process of this machine): the client subtracts `sent` from its own arrival time.
        """
        loop, transport = asyncio.get_running_loop(), self.transport
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n")
        head = {**base, "object": "chat.completion.chunk"}
        prefix = ("data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {
            "content": "@"}, "finish_reason": None}]})).encode().split(b"@")
        role = prefix[0].replace(b'"delta": {', b'"delta": {"role": "assistant", ')
        events = [{**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if usage:
            events.append({**head, "choices": [], "usage": {
                "prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks}})
        tail = b"".join(b"data: %b\n\n" % json.dumps(e).encode() for e in events)
        tail += b"data: [DONE]\n\n"
        tail = b"%x\r\n%b\r\n0\r\n\r\n" % (len(tail), tail)
        start = loop.time()  # asyncio's clock is time.monotonic()

        def send(seq: int) -> None:
            if transport.is_closing():
                return
            due = round((start + seq * gap) * 1e9)
            frame = b"%b%d %d %d %b\n\n" % (role if seq == 0 else prefix[0], seq, due,
                                               time.monotonic_ns(), prefix[1])
            transport.write(b"%x\r\n%b\r\n" % (len(frame), frame))
            if seq + 1 < chunks:
                loop.call_at(start + (seq + 1) * gap, send, seq + 1)
            else:
                transport.write(tail)

        send(0)


TICKS = re.compile(r"ticks-(\d+)x(\d+(?:\.\d+)?)")
"""The model `ticks-<chunks>x<gap ms>`: a stream of that many timestamped chunks."""


def serve_fake(port: int, gap_ms: float) -> None:
    FakeOpenAI.gap = gap_ms / 1000

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(FakeOpenAI, "127.0.0.1", port,
                                                                backlog=4096)
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# --- 2-4. the processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (kB) and CPU seconds of `pid` with all its descendants (mitmroute's spend
    sidecar, LiteLLM's workers), and of `pid` alone (`own_*`): so a cost moved into a child
    process still counts, and the proxy process's own share shows too."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    keys = ("VmRSS", "VmHWM", "cpu")
    out = dict.fromkeys(keys + tuple(f"own_{k}" for k in keys), 0.0)
    for p in tree:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            one = {"cpu": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in keys:
                    one[name] = int(value.split()[0])
            for k, v in one.items():
                out[k] += v
                if p == pid:
                    out[f"own_{k}"] = v
    return out


@dataclass
class Service:
    name: str
    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:  # its own session, so stop() reaches its children
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, cwd=self.log.parent,
                                         start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not listening on {self.port} after {timeout:.0f}s")

    def stats(self) -> dict[str, float]:
        assert self.proc is not None
        return proc_stats(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
                return


def bench_config(backend: str, general: dict[str, Any], cache: dict | None,
                 ticks_model: str | None = None) -> dict[str, Any]:
    def dep(group: str, model: str) -> dict[str, Any]:
        return {"model_name": group, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{backend}/v1", "api_key": "sk-fake"}}

    config: dict[str, Any] = {
        "model_list": [dep("bench", "bench-model"), dep("flaky", "fail-500")]
        + ([dep(ticks_model, ticks_model)] if ticks_model else []),
        # every fallback request pays for the failing attempt: no cooldown, no retry
        "router_settings": {"fallbacks": [{"flaky": ["bench"]}], "num_retries": 0,
                            "allowed_fails": 1_000_000},
        "general_settings": general,
    }
    if cache is not None:
        config["litellm_settings"] = {"cache": True, "cache_params": cache}
    return config


LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"}


def litellm_version(python: str) -> str | None:
    """LiteLLM's version when `python` can run its proxy, else None."""
    code = "import litellm.proxy.proxy_server, importlib.metadata as m; print(m.version('litellm'))"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **LITELLM_ENV})
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[-1]
    return None


def make_services(tmp: Path, fake_port: int, namespace: str, litellm_python: str | None,
                  gap_ms: float, ticks_model: str | None) -> dict[str, Service]:
    import yaml

    backend = f"http://127.0.0.1:{fake_port}"
    services = {"fake": Service("fake", [sys.executable, __file__, "--serve-fake", str(fake_port),
                                         "--stream-gap-ms", str(gap_ms)],
                                fake_port, tmp / "fake.log")}

    def add(name: str, args: list[str], config: dict | None = None, **env: str) -> None:
        port = free_port()
        if config is not None:
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
        if args[0] == MITMDUMP:
            args = [*args, "--listen-host", "127.0.0.1", "-p", str(port), "--set",
                    f"confdir={tmp}", *QUIET]
        else:
            args = [*args, "--host", "127.0.0.1", "--port", str(port)]
        services[name] = Service(name, args, port, tmp / f"{name}.log", env)

    caches = {"mitmroute": None, "mr-cache-local": {"type": "local"},
              "mr-cache-redis": {"type": "redis", "host": "127.0.0.1", "port": 6379,
                                 "namespace": namespace}}
    for name, cache in caches.items():
        add(name, [MITMDUMP, "-s", str(ROOT / "addons" / "router.py"), "--set",
                   f"router_config={tmp / name}.yaml"],
            bench_config(backend, {"spend_db": str(tmp / f"spend-{name}.duckdb")}, cache,
                         ticks_model))
    add("bare", [MITMDUMP, "-s", str(ROOT / "scripts" / "bench_rewrite_addon.py"), "--set",
                 f"bench_upstream={backend}", "--set", "connection_strategy=lazy"])
    if litellm_python:  # no database: LiteLLM's spend log needs Postgres
        add("litellm", [litellm_python, "-c", "from litellm.proxy.proxy_cli import run_server; "
                        "run_server()", "--config", str(tmp / "litellm.yaml"), "--num_workers",
                        "1"], bench_config(backend, {"master_key": KEY}, None, None),
            **LITELLM_ENV)
    return services


# --- 5-6. the load ---------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    what: str
    targets: list[str]
    concurrency: int = 1
    stream_every: int = 0  # 1: every request streamed; 4: every 4th
    model: str = "bench"
    streams: int = 0  # > 0: the concurrent-streams scenario, this many streams open at once


@dataclass
class Samples:
    latency: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    hit_latency: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    wall: float = 0.0
    cpu: float | None = None  # the proxy's CPU seconds (its process tree)
    cpu_own: float | None = None  # the proxy process alone
    round_p50: list[float] = field(default_factory=list)
    rss_kb: list[tuple[int, int]] = field(default_factory=list)  # (requests so far, VmRSS)


def scenarios(litellm: bool, streams: int, chunks: int, gap_ms: float) -> list[Scenario]:
    base = ["direct", "bare", "mitmroute"] + (["litellm"] if litellm else [])
    return [
        Scenario("chat-c1", "non-streamed, concurrency 1", base),
        Scenario("chat-c8", "non-streamed, concurrency 8", base, concurrency=8),
        Scenario("stream", "streamed (6 chunks + usage), concurrency 1", base, stream_every=1),
        Scenario("cache-local", "one request repeated, local cache", ["direct", "bare",
                                                                      "mr-cache-local"]),
        Scenario("cache-redis", "one request repeated, Redis cache", ["direct", "bare",
                                                                      "mr-cache-redis"]),
        Scenario("fallback", "group `flaky` (fail-500) falls back to `bench`; direct/bare send "
                 "it straight to the backend", base, model="flaky"),
        Scenario("soak", "RSS: non-streamed + every 4th streamed, concurrency 8",
                 ["bare", "mitmroute"], concurrency=8, stream_every=4),
        Scenario("streams", f"{streams} concurrent streams of {chunks} chunks {gap_ms:g} ms "
                 "apart", ["direct", "bare", "mitmroute"], model=f"ticks-{chunks}x{gap_ms:g}",
                 streams=streams),
    ]


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.shown, self.t0 = total, 0, 0.0, time.monotonic()
        self.label, self.tty = "", sys.stderr.isatty()

    def step(self, label: str | None = None) -> None:
        self.label, self.done = label or self.label, self.done + (label is None)
        line = f"{100 * self.done / self.total:3.0f}% {time.monotonic() - self.t0:4.0f}s "
        line += self.label
        if not self.tty and label is not None:
            print(f"[bench] {line}", file=sys.stderr)
        elif self.tty and (label is not None or time.monotonic() - self.shown > 0.2):
            self.shown = time.monotonic()
            bar = "#" * int(30 * self.done / self.total)
            print(f"\r[{bar:<30}] {line:<52}", end="", file=sys.stderr, flush=True)


@dataclass
class Client:
    url: str
    kwargs: dict[str, Any]
    session: Any


async def drive(client: Client, sc: Scenario, n: int, out: Samples | None,
                progress: Progress) -> None:
    """n requests, `sc.concurrency` at a time, closed loop; samples go to `out` (None: warm-up)."""
    import aiohttp

    messages = [{"role": "user", "content": "echo the quick fox"}]
    bodies = [json.dumps({"model": sc.model, "messages": messages, "stream": s}).encode()
              for s in (False, True)]
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    left, latencies = n, []

    async def one(stream: bool) -> None:
        t0, first, data, error = time.perf_counter(), 0.0, b"", ""
        try:
            async with client.session.post(client.url, data=bodies[stream], headers=headers,
                                           **client.kwargs) as resp:
                if stream:
                    async for chunk in resp.content.iter_any():
                        first, data = first or time.perf_counter(), chunk
                    ok = resp.status == 200 and data.rstrip().endswith(b"[DONE]")
                else:
                    data = await resp.read()
                    ok = resp.status == 200 and b'"choices"' in data
                hit = resp.headers.get("x-mitmroute-cache", "").upper().startswith("HIT")
                error = "" if ok else f"HTTP {resp.status}: {data[:300]!r}"
        except (aiohttp.ClientError, TimeoutError) as e:
            hit, error = False, f"{type(e).__name__}: {e}"
        elapsed = (time.perf_counter() - t0) * 1000
        if out is None:
            return
        if error:
            out.errors += 1
            out.first_error = out.first_error or error
        out.latency.append(elapsed)
        latencies.append(elapsed)
        if first:
            out.ttfc.append((first - t0) * 1000)
        if hit:
            out.hit_latency.append(elapsed)
        progress.step()

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(sc.stream_every > 0 and left % sc.stream_every == 0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sc.concurrency)))
    if out is not None:
        out.wall += time.perf_counter() - t0
        out.round_p50.append(pct(sorted(latencies), 50))


async def run_load(services: dict[str, Service], bundle: Path, plan: list[Scenario],
                   sizes: dict[str, int], rounds: int) -> tuple[dict, dict[str, int]]:
    """Warm every target up, then `rounds` rounds of every scenario, targets rotated."""
    import aiohttp

    ctx = ssl.create_default_context(cafile=str(bundle))
    clients: dict[str, Client] = {}
    plan = [sc for sc in plan if not sc.streams]
    for t in {t for sc in plan for t in sc.targets}:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16, ssl=ctx),
                                        timeout=aiohttp.ClientTimeout(total=30))
        port = services["fake" if t == "direct" else t].port
        if t in PROXIED:
            kwargs = {"proxy": f"http://127.0.0.1:{port}", "ssl": ctx}
            clients[t] = Client("https://api.openai.com/v1/chat/completions", kwargs, session)
        else:
            clients[t] = Client(f"http://127.0.0.1:{port}/v1/chat/completions", {}, session)
    results = {sc.name: {t: Samples() for t in sc.targets} for sc in plan}
    progress = Progress(sum(sizes[sc.name] * len(sc.targets) for sc in plan))
    try:
        for sc in plan:  # connections, TLS, leaf certificates, the cache's first miss
            for t in sc.targets:
                progress.step(f"warm-up {sc.name} -> {t}")
                await drive(clients[t], sc, 4 * sc.concurrency + 8, None, progress)
        baseline = {name: s.stats() for name, s in services.items()}
        for r in range(rounds):
            for sc in plan:
                k = r % len(sc.targets)
                for t in sc.targets[k:] + sc.targets[:k]:
                    progress.step(f"round {r + 1}/{rounds} {sc.name} -> {t}")
                    samples, service = results[sc.name][t], services.get(t)
                    before = service.stats() if service else {}
                    if before and not samples.rss_kb:
                        samples.rss_kb.append((0, before["VmRSS"]))
                    n = sizes[sc.name] // rounds + (r < sizes[sc.name] % rounds)
                    await drive(clients[t], sc, n, samples, progress)
                    if service:
                        after = service.stats()
                        samples.cpu = (samples.cpu or 0.0) + after["cpu"] - before["cpu"]
                        samples.cpu_own = ((samples.cpu_own or 0.0) + after["own_cpu"]
                                           - before["own_cpu"])
                        samples.rss_kb.append((len(samples.latency), after["VmRSS"]))
    finally:
        for c in clients.values():
            await c.session.close()
        print(file=sys.stderr)
    return results, baseline


# --- 6b. the concurrent-streams scenario ----------------------------------------------------

STALL_NS = 1_000_000_000  # a stream with no chunk for longer than this is stalled
TICK = re.compile(rb'"content": ?"(\d+) (\d+) (\d+) ')


@dataclass
class StreamSamples:
    delay: list[float] = field(default_factory=list)  # per chunk: client arrival - backend send, ms
    lag: list[float] = field(default_factory=list)  # per chunk: backend send - its schedule, ms
    ttfc: list[float] = field(default_factory=list)  # per stream, ms
    max_gap: list[float] = field(default_factory=list)  # per stream: longest wait for a chunk, ms
    streams: int = 0
    stalled: int = 0
    dropped: int = 0
    first_error: str = ""
    cpu: float | None = None  # the proxy's CPU seconds over the measured rounds
    idle_rss_kb: int = 0  # before the scenario's first warm-up: no stream connection open yet
    plateau_rss_kb: int = 0  # the highest VmRSS sampled while the streams ran
    wall: float = 0.0


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def vm_rss_kb(pid: int) -> int:
    """VmRSS of `pid` alone: cheap enough to poll while the streams run."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def one_stream(client: Client, body: bytes, chunks: int, out: StreamSamples) -> None:
    """One streamed request; every chunk's delay, the stream's TTFC, stall and completeness."""
    import aiohttp

    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    t0 = last = time.monotonic_ns()
    seen, longest, first, rest, done, error = 0, 0, 0, b"", False, ""
    delays, lags = [], []
    try:
        async with client.session.post(client.url, data=body, headers=headers,
                                       **client.kwargs) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.read())[:300]!r}"
            async for data in resp.content.iter_any():
                now = time.monotonic_ns()
                longest, last = max(longest, now - last), now
                data, cut = rest + data, 0
                for m in TICK.finditer(data):
                    if int(m[1]) != seen:
                        error = error or f"chunk {int(m[1])} arrived where {seen} was due"
                    seen, cut, sent = seen + 1, m.end(), int(m[3])
                    delays.append((now - sent) / 1e6)
                    lags.append((sent - int(m[2])) / 1e6)
                    first = first or now
                done = done or b"data: [DONE]" in data
                rest = data[max(cut, len(data) - 200):]  # a frame cut in two by the reads
    except (aiohttp.ClientError, TimeoutError) as e:
        error = error or f"{type(e).__name__}: {e}"
    longest = max(longest, time.monotonic_ns() - last) if not done else longest
    if not error and (seen != chunks or not done):
        error = f"{seen} of {chunks} chunks" + ("" if done else ", no [DONE]")
    out.streams += 1
    out.delay += delays
    out.lag += lags
    out.max_gap.append(longest / 1e6)
    if first:
        out.ttfc.append((first - t0) / 1e6)
    out.stalled += longest > STALL_NS
    if error:
        out.dropped += 1
        out.first_error = out.first_error or error


async def drive_streams(client: Client, sc: Scenario, chunks: int, ramp: float,
                        service: Service | None, out: StreamSamples) -> None:
    """`sc.streams` streams started evenly over `ramp` seconds, sampling the proxy's RSS."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": sc.model, "stream": True,
                       "messages": [{"role": "user", "content": "count"}]}).encode()

    async def start(i: int) -> None:
        await asyncio.sleep(i * ramp / sc.streams)
        await one_stream(client, body, chunks, out)

    async def sample_rss() -> None:
        while service is not None and service.proc is not None:
            out.plateau_rss_kb = max(out.plateau_rss_kb, vm_rss_kb(service.proc.pid))
            await asyncio.sleep(0.1)

    before = service.stats() if service else {}
    sampler = loop.create_task(sample_rss())
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(start(i) for i in range(sc.streams)))
    finally:
        sampler.cancel()
    out.wall += time.perf_counter() - t0
    if service:
        out.cpu = (out.cpu or 0.0) + service.stats()["cpu"] - before["cpu"]


async def run_streams(services: dict[str, Service], bundle: Path, sc: Scenario, chunks: int,
                      gap_ms: float, ramp_ms: float, rounds: int) -> dict[str, StreamSamples]:
    """`rounds` rounds of `sc.streams` concurrent streams through each target, rotated.

    Each round opens its own connections first (sc.streams concurrent short streams: CONNECT,
    TLS, the proxy's upstream and relay connections), so the streams measure relaying, not
    handshakes; the session is closed after the round so the proxy lets them go.
    """
    import aiohttp

    ctx = ssl.create_default_context(cafile=str(bundle))
    results = {t: StreamSamples() for t in sc.targets}
    warm = Scenario("warm", "", [], concurrency=sc.streams, stream_every=1)
    progress = Progress(rounds * len(sc.targets))
    for r in range(rounds):
        k = r % len(sc.targets)
        for t in sc.targets[k:] + sc.targets[:k]:
            progress.step(f"round {r + 1}/{rounds} {sc.name} -> {t}")
            service = services.get(t)
            if service and not results[t].idle_rss_kb:
                results[t].idle_rss_kb = vm_rss_kb(service.proc.pid)  # type: ignore[union-attr]
            connector = aiohttp.TCPConnector(limit=0, ssl=ctx, keepalive_timeout=60)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                port = services["fake" if t == "direct" else t].port
                if t in PROXIED:
                    client = Client("https://api.openai.com/v1/chat/completions",
                                    {"proxy": f"http://127.0.0.1:{port}", "ssl": ctx}, session)
                else:
                    client = Client(f"http://127.0.0.1:{port}/v1/chat/completions", {}, session)
                await drive(client, warm, sc.streams, None, progress)
                await drive_streams(client, sc, chunks, ramp_ms / 1000, service, results[t])
            progress.step()
    print(file=sys.stderr)
    return results


# --- 7-8. statistics and report --------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of sorted `xs`, interpolated."""
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(results: dict[str, dict[str, Samples]], plan: list[Scenario]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in plan:
        if sc.streams:
            continue
        rows: dict[str, Any] = {}
        for t, s in results[sc.name].items():
            lat, ttfc, hits = sorted(s.latency), sorted(s.ttfc), sorted(s.hit_latency)
            rows[t] = {
                "n": len(lat), "errors": s.errors, "first_error": s.first_error,
                "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
                "rps": len(lat) / s.wall if s.wall else 0.0, "round_p50_ms": s.round_p50,
                "cpu_ms_per_req": s.cpu * 1000 / len(lat) if s.cpu is not None and lat else None,
                "cpu_own_ms_per_req": (s.cpu_own * 1000 / len(lat)
                                       if s.cpu_own is not None and lat else None),
                "ttfc_p50_ms": pct(ttfc, 50) if ttfc else None,
                "ttfc_p90_ms": pct(ttfc, 90) if ttfc else None,
                "cache_hit_ratio": len(hits) / len(lat) if lat else 0.0,
                "cache_hit_p50_ms": pct(hits, 50) if hits else None, "rss_kb": s.rss_kb,
            }
        direct, bare, lite = rows.get("direct"), rows.get("bare"), rows.get("litellm")
        for row in rows.values():
            row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"] if direct else None
            row["added_ttfc_p50_ms"] = (row["ttfc_p50_ms"] - direct["ttfc_p50_ms"]
                                        if direct and row["ttfc_p50_ms"] is not None else None)
        for row in rows.values():
            row["added_vs_bare"] = (row["added_p50_ms"] / bare["added_p50_ms"] if direct and bare
                                    and row is not direct and bare["added_p50_ms"] > 0 else None)
            row["rps_vs_bare"] = row["rps"] / bare["rps"] if bare and bare["rps"] else None
            row["rps_vs_litellm"] = row["rps"] / lite["rps"] if lite and lite["rps"] else None
            row["cpu_vs_bare"] = (row["cpu_ms_per_req"] / bare["cpu_ms_per_req"]
                                  if bare and bare["cpu_ms_per_req"] and row["cpu_ms_per_req"]
                                  else None)
        out[sc.name] = {"what": sc.what, "concurrency": sc.concurrency, "targets": rows}
    return out


CURVE = [0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]  # percentiles kept for the chart


def summarize_streams(results: dict[str, StreamSamples], sc: Scenario, chunks: int,
                      gap_ms: float) -> dict[str, Any]:
    """Per target: chunk delay, TTFC, stalls, drops, CPU and RSS per open stream."""
    rows: dict[str, Any] = {}
    for t, s in results.items():
        delay, ttfc, lag = sorted(s.delay), sorted(s.ttfc), sorted(s.lag)
        cpu = s.cpu * 1000 / s.streams if s.cpu is not None and s.streams else None
        rss = ((s.plateau_rss_kb - s.idle_rss_kb) / sc.streams if s.plateau_rss_kb else None)
        rows[t] = {
            "n": s.streams, "chunks": len(delay), "errors": s.dropped,
            "first_error": s.first_error, "stalled": s.stalled, "dropped": s.dropped,
            "delay_p50_ms": pct(delay, 50), "delay_p99_ms": pct(delay, 99),
            "delay_max_ms": delay[-1] if delay else None,
            "delay_curve_ms": [[q, pct(delay, q)] for q in CURVE] if delay else [],
            "backend_lag_p99_ms": pct(lag, 99), "max_gap_ms": max(s.max_gap, default=None),
            "ttfc_p50_ms": pct(ttfc, 50) if ttfc else None,
            "ttfc_p99_ms": pct(ttfc, 99) if ttfc else None,
            "cpu_ms_per_stream": cpu, "cpu_us_per_chunk": cpu and cpu * 1000 / chunks,
            "idle_rss_kb": s.idle_rss_kb or None, "plateau_rss_kb": s.plateau_rss_kb or None,
            "rss_kb_per_stream": rss, "streams_per_s": s.streams / s.wall if s.wall else 0.0,
            "chunks_per_s": len(delay) / s.wall if s.wall else 0.0,
        }
    direct, bare = rows.get("direct"), rows.get("bare")
    for row in rows.values():
        for q in ("p50", "p99"):
            row[f"added_{q}_ms"] = (row[f"delay_{q}_ms"] - direct[f"delay_{q}_ms"]
                                    if direct else None)
        row["added_p99_vs_bare"] = (row["added_p99_ms"] / bare["added_p99_ms"] if direct and bare
                                    and row is not direct and bare["added_p99_ms"] > 0 else None)
        row["cpu_vs_bare"] = (row["cpu_ms_per_stream"] / bare["cpu_ms_per_stream"]
                              if bare and bare["cpu_ms_per_stream"] and row["cpu_ms_per_stream"]
                              else None)
        row["rss_per_stream_vs_bare"] = (row["rss_kb_per_stream"] / bare["rss_kb_per_stream"]
                                         if bare and (bare["rss_kb_per_stream"] or 0) > 0
                                         and row["rss_kb_per_stream"] is not None else None)
    return {"what": sc.what, "concurrency": sc.streams, "chunks": chunks, "gap_ms": gap_ms,
            "targets": rows}


def evaluate(summary: dict[str, Any], processes: dict[str, Any],
             full: bool) -> list[dict[str, Any]]:
    """The issue-15 targets and the older checks that still hold; SKIP what was not run."""
    checks: list[dict[str, Any]] = []

    def row(sc: str, t: str) -> dict[str, Any]:
        return summary[sc]["targets"].get(t) or {}

    def check(name: str, needs: list[str], judge: Any) -> None:
        """`judge()` -> (ok, detail), called only when every scenario in `needs` ran."""
        if missing := [n for n in needs if n not in summary]:
            ok, detail = None, f"not run: {', '.join(missing)}"
        else:
            ok, detail = judge()
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        checks.append({"check": name, "status": status, "detail": detail})

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def added_p50() -> tuple[bool, str]:
        mr, bare = row("chat-c1", "mitmroute"), row("chat-c1", "bare")
        ratio = mr["added_vs_bare"]
        return ratio is not None and ratio <= 1.3, (
            f"mitmroute +{mr['added_p50_ms']:.2f} ms vs bare +{bare['added_p50_ms']:.2f} ms "
            f"over direct = {x(ratio)}")

    def cpu(names: list[str]) -> Any:
        def judge() -> tuple[bool, str]:
            ratios = {n: row(n, "mitmroute")["cpu_vs_bare"] for n in names}
            parts = [f"{n}: {row(n, 'mitmroute')['cpu_ms_per_req']:.2f} vs "
                     f"{row(n, 'bare')['cpu_ms_per_req']:.2f} ms = {x(r)}"
                     for n, r in ratios.items()]
            return all(r is not None and r <= 1.2 for r in ratios.values()), "; ".join(parts)
        return judge

    def rps(name: str, over: str, floor: float) -> Any:
        def judge() -> tuple[bool | None, str]:
            mr, other = row(name, "mitmroute"), row(name, over)
            if not other:
                return None, f"{over} not run"
            ratio = mr["rps"] / other["rps"] if other["rps"] else None
            return ratio is not None and ratio >= floor, (
                f"{mr['rps']:.0f} vs {other['rps']:.0f} req/s = {x(ratio)}")
        return judge

    def cache(kind: str) -> Any:
        def judge() -> tuple[bool, str]:
            cached, bare = row(f"cache-{kind}", f"mr-cache-{kind}"), row(f"cache-{kind}", "bare")
            hit = cached["cache_hit_p50_ms"]
            return hit is not None and hit < bare["p50_ms"], (
                ("no `x-mitmroute-cache: HIT` answers" if hit is None else
                 f"hit p50 {hit:.2f} ms") + f" vs bare {bare['p50_ms']:.2f} ms; "
                f"HIT ratio {cached['cache_hit_ratio']:.0%}")
        return judge

    def ttfc() -> tuple[bool, str]:
        mr, bare = row("stream", "mitmroute"), row("stream", "bare")
        diff = mr["ttfc_p50_ms"] - bare["ttfc_p50_ms"]
        return diff <= 0.5, (f"p50 {mr['ttfc_p50_ms']:.2f} vs {bare['ttfc_p50_ms']:.2f} ms "
                             f"= {diff:+.2f} ms")

    def rss_warm() -> tuple[bool, str]:
        mr, bare = processes["mitmroute"]["start_rss_kb"], processes["bare"]["start_rss_kb"]
        return mr <= 1.5 * bare, (f"{mr / 1024:.1f} vs {bare / 1024:.1f} MB = "
                                  f"{x(mr / bare)}")

    def rss_flat() -> tuple[bool | None, str]:
        rss = row("soak", "mitmroute")["rss_kb"]
        (_, before), (n, after) = rss[0], rss[-1]
        growth = (after - before) / before
        return growth < 0.10 if full else None, (
            f"{n} requests: {before / 1024:.1f} -> {after / 1024:.1f} MB = {growth:+.1%}"
            + ("" if full else " (smoke: not judged)"))

    def streams_p99() -> tuple[bool, str]:
        mr, bare = row("streams", "mitmroute"), row("streams", "bare")
        ratio = mr["added_p99_vs_bare"]
        return ratio is not None and ratio <= 2.0, (
            f"p99 +{mr['added_p99_ms']:.2f} ms vs bare +{bare['added_p99_ms']:.2f} ms over "
            f"direct's {row('streams', 'direct')['delay_p99_ms']:.2f} ms = {x(ratio)}")

    def streams_whole() -> tuple[bool, str]:
        rows = summary["streams"]["targets"]
        bad = {t: (r["stalled"], r["dropped"]) for t, r in rows.items()}
        floor = ("; bare mitmdump stalled too: the load is beyond mitmproxy's own relay here"
                 if rows.get("bare", {}).get("stalled") else "")
        return bad["mitmroute"] == (0, 0) and rows["mitmroute"]["n"] > 0, (
            "; ".join(f"{t}: {r['n']} streams, {bad[t][0]} stalled, {bad[t][1]} dropped"
                      for t, r in rows.items()) + floor + next(
                (f"; first error ({t}): {r['first_error']}" for t, r in rows.items()
                 if r["first_error"]), ""))

    check("non-streamed added latency p50 <= 1.3x bare mitmdump's", ["chat-c1"], added_p50)
    check("CPU per routed chat request <= 1.2x bare's", ["chat-c1", "chat-c8"],
          cpu(["chat-c1", "chat-c8"]))
    check("CPU per routed streamed request <= 1.2x bare's", ["stream"], cpu(["stream"]))
    check("req/s at concurrency 8 >= 0.9x bare mitmdump's", ["chat-c8"],
          rps("chat-c8", "bare", 0.9))
    check("req/s in the soak >= 0.9x bare mitmdump's", ["soak"], rps("soak", "bare", 0.9))
    check("req/s at concurrency 8 >= 3x LiteLLM's", ["chat-c8"], rps("chat-c8", "litellm", 3))
    for kind in ("local", "redis"):
        check(f"{kind} cache hit p50 < bare passthrough p50", [f"cache-{kind}"], cache(kind))
    check("time to first streamed chunk within 0.5 ms of bare mitmdump's", ["stream"], ttfc)
    check("RSS after warm-up <= 1.5x bare mitmdump's", ["chat-c1"], rss_warm)
    check("RSS flat over the soak (growth < 10%)", ["soak"], rss_flat)
    check("concurrent streams: per-chunk added delay p99 <= 2x bare's", ["streams"],
          streams_p99)
    check("concurrent streams: none stalled (> 1 s without a chunk) or dropped", ["streams"],
          streams_whole)
    return checks


def markdown(summary: dict[str, Any], processes: dict[str, Any], checks: list[dict]) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    cols = ["scenario", "target", "n", "err", "p50 ms", "p90 ms", "p99 ms", "+p50 vs direct",
            "+p50 / bare's", "req/s", "req/s / bare's", "req/s / LiteLLM's", "TTFC p50 ms",
            "+TTFC vs direct", "cache HIT", "proxy CPU ms/req", "CPU / bare's",
            "proxy process alone CPU ms/req", "peak RSS MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    requests = {name: sc for name, sc in summary.items() if name != "streams"}
    for name, sc in requests.items():
        for t, r in sc["targets"].items():
            peak = processes.get(t, {}).get("peak_rss_kb")
            cells = [name, t, r["n"], r["errors"], f(r["p50_ms"]), f(r["p90_ms"]),
                     f(r["p99_ms"]), f(r["added_p50_ms"], "+.2f"), f(r["added_vs_bare"]),
                     f(r["rps"], ".0f"), f(r["rps_vs_bare"]), f(r["rps_vs_litellm"]),
                     f(r["ttfc_p50_ms"]), f(r["added_ttfc_p50_ms"], "+.2f"),
                     f"{r['cache_hit_ratio']:.0%}", f(r["cpu_ms_per_req"]), f(r["cpu_vs_bare"]),
                     f(r.get("cpu_own_ms_per_req")), f(peak and peak / 1024, ".1f")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if not requests:
        lines = []
    if "streams" in summary:
        sc = summary["streams"]
        cols = ["streams: target", "streams", "chunks", "chunk delay p50 ms", "p99 ms", "max ms",
                "+p50 vs direct", "+p99 vs direct", "+p99 / bare's", "TTFC p50 ms", "TTFC p99 ms",
                "stalled", "dropped", "longest gap ms", "backend lag p99 ms", "chunks/s",
                "CPU ms/stream",
                "CPU us/chunk", "CPU / bare's", "idle RSS MB", "plateau RSS MB", "RSS kB/stream",
                "RSS / bare's"]
        lines += ["", f"Concurrent streams: {sc['what']} (asked: "
                  f"{sc['concurrency'] * 1000 / sc['gap_ms']:.0f} chunks/s while all are open).",
                  "",
                  "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for t, r in sc["targets"].items():
            cells = [t, r["n"], r["chunks"], f(r["delay_p50_ms"]), f(r["delay_p99_ms"]),
                     f(r["delay_max_ms"]), f(r["added_p50_ms"], "+.2f"),
                     f(r["added_p99_ms"], "+.2f"), f(r["added_p99_vs_bare"]),
                     f(r["ttfc_p50_ms"]), f(r["ttfc_p99_ms"]), r["stalled"], r["dropped"],
                     f(r["max_gap_ms"], ".0f"), f(r["backend_lag_p99_ms"]),
                     f(r["chunks_per_s"], ".0f"), f(r["cpu_ms_per_stream"]),
                     f(r["cpu_us_per_chunk"], ".0f"),
                     f(r["cpu_vs_bare"]), f(r["idle_rss_kb"] and r["idle_rss_kb"] / 1024, ".1f"),
                     f(r["plateau_rss_kb"] and r["plateau_rss_kb"] / 1024, ".1f"),
                     f(r["rss_kb_per_stream"], ".1f"), f(r["rss_per_stream_vs_bare"])]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| process (with its children) | peak RSS MB (VmHWM) | RSS after warm-up MB "
              "| RSS at end MB | growth | the process alone: RSS after warm-up MB | at end MB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {t} | {p['peak_rss_kb'] / 1024:.1f} | {p['start_rss_kb'] / 1024:.1f} | "
              f"{p['end_rss_kb'] / 1024:.1f} | {p['growth']:+.1%} | "
              f"{p.get('start_rss_own_kb', 0) / 1024:.1f} | "
              f"{p.get('end_rss_own_kb', 0) / 1024:.1f} |"
              for t, p in processes.items()]
    lines += [""] + [f"- **{c['status']}** {c['check']}: {c['detail']}" for c in checks]
    lines += [f"- errors in {name} -> {t}: {r['errors']}, first: {r['first_error']}"
              for name, sc in summary.items() for t, r in sc["targets"].items() if r["errors"]]
    return "\n".join(lines).lstrip("\n") + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(20, 9))
    cats = {n: {t: (r["p50_ms"], r["p90_ms"], r["added_p50_ms"]) for t, r in s["targets"].items()}
            for n, s in summary.items() if n not in {"soak", "streams"}}
    if "stream" in summary:
        cats["stream TTFC"] = {t: (r["ttfc_p50_ms"], r["ttfc_p90_ms"], r["added_ttfc_p50_ms"])
                               for t, r in summary["stream"]["targets"].items()}
    targets = [t for t in ORDER if any(t in c for c in cats.values())]
    width = 0.8 / max(len(targets), 1)
    for ax, i_val, title in ((axes[0][0], 0, "p50 latency, ms (whisker: p90)"),
                             (axes[0][1], 2, "p50 latency added over direct, ms")):
        for i, t in enumerate(targets):
            xs = [j + i * width for j, c in enumerate(cats.values()) if t in c]
            vals = [c[t] for c in cats.values() if t in c]
            ax.bar(xs, [v[i_val] or 0 for v in vals], width, label=t)
            if i_val == 0:
                ax.errorbar(xs, [v[0] for v in vals], [[0] * len(vals),
                            [v[1] - v[0] for v in vals]], fmt="none", ecolor="k")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], list(cats), fontsize=8)
        ax.set_title(title)
        if targets:
            ax.legend(fontsize=8)
    if "chat-c8" in summary:
        rows = summary["chat-c8"]["targets"]
        axes[1][0].barh(list(rows), [r["rps"] for r in rows.values()])
    axes[1][0].set_title("req/s, non-streamed, concurrency 8")
    for t, r in summary.get("soak", {}).get("targets", {}).items():
        axes[1][1].plot([n for n, _ in r["rss_kb"]], [kb / 1024 for _, kb in r["rss_kb"]], "o-",
                        label=t)
    axes[1][1].set_title("soak: RSS (MB) vs requests")
    for ax in (axes[0][2], axes[1][2]):
        ax.set_axis_off()
    if "streams" in summary:
        sc, ax = summary["streams"], axes[0][2]
        ax.set_axis_on()
        for t, r in sc["targets"].items():
            qs, ms = zip(*r["delay_curve_ms"], strict=True) if r["delay_curve_ms"] else ((), ())
            ax.plot(range(len(qs)), ms, "o-", label=t)
            ax.set_xticks(range(len(qs)), [f"p{q:g}" for q in qs], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"concurrent streams ({sc['what']}):\nper-chunk delay, backend send -> "
                     "client, ms", fontsize=9)
        ax.legend(fontsize=8)
        ax, proxied = axes[1][2], {t: r for t, r in sc["targets"].items() if t != "direct"}
        ax.set_axis_on()
        rss_ax, xs = ax.twinx(), range(len(proxied))
        cpu = ax.bar([x - 0.2 for x in xs], [r["cpu_ms_per_stream"] or 0
                                             for r in proxied.values()], 0.4, color="tab:orange")
        rss = rss_ax.bar([x + 0.2 for x in xs], [r["rss_kb_per_stream"] or 0
                                                 for r in proxied.values()], 0.4, color="tab:green")
        ax.bar_label(cpu, fmt="%.1f", fontsize=8)
        rss_ax.bar_label(rss, fmt="%.0f", fontsize=8)
        ax.set_xticks(list(xs), list(proxied))
        ax.set_ylabel("proxy CPU ms per stream", color="tab:orange")
        rss_ax.set_ylabel("RSS kB per open stream", color="tab:green")
        ax.set_title("concurrent streams: proxy CPU and RSS per open stream", fontsize=9)
    if axes[1][1].get_legend_handles_labels()[0]:
        axes[1][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, help="per target and scenario (default 2000; smoke 40)")
    p.add_argument("--soak", type=int, help="soak requests per target (default 20000; smoke 200)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; smoke 2)")
    p.add_argument("--smoke", action="store_true", help="a few dozen requests each, < 60 s")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    p.add_argument("--litellm-python", help="a python that can import litellm.proxy (default: "
                   "this one; not tried in --smoke unless given)")
    p.add_argument("--stream-gap-ms", type=float, default=1.0,
                   help="fake's gap between chunks in the `stream` scenario")
    p.add_argument("--streams", type=int,
                   help="concurrent streams in `streams` (default 1000; smoke 50)")
    p.add_argument("--chunks", type=int, help="chunks per stream there (default 100; smoke 10)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="gap between those chunks")
    p.add_argument("--ramp-ms", type=float, help="the streams start evenly over this time "
                   "(default: half a stream's length, so all are open for the other half)")
    p.add_argument("--stream-rounds", type=int,
                   help="rounds of `streams` per target (default 3; smoke 1)")
    p.add_argument("--only", action="append", metavar="SCENARIO",
                   help="run only this scenario (repeatable): chat-c1, chat-c8, stream, "
                   "cache-local, cache-redis, fallback, soak, streams")
    p.add_argument("--keep-logs", action="store_true",
                   help="copy every process's log to OUT/logs/ (they are deleted otherwise)")
    p.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p.parse_args()


def git_revision() -> str:
    """The commit measured, `+dirty` when the work tree had changes."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                        text=True, timeout=10).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain")
                                                       else "")
    return "unknown"


def main() -> int:
    args = parse_args()
    if args.serve_fake is not None:
        serve_fake(args.serve_fake, args.stream_gap_ms)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    open_files = raise_open_files_limit()  # before any child starts: they inherit it
    requests = args.requests or (40 if args.smoke else 2000)
    rounds = args.rounds or (2 if args.smoke else 5)
    streams = args.streams or (50 if args.smoke else 1000)
    chunks = args.chunks or (10 if args.smoke else 100)
    stream_rounds = args.stream_rounds or (1 if args.smoke else 3)
    ramp_ms = args.ramp_ms if args.ramp_ms is not None else chunks * args.gap_ms / 2
    names = [sc.name for sc in scenarios(False, streams, chunks, args.gap_ms)]
    if unknown := set(args.only or []) - set(names):
        print(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(names)}",
              file=sys.stderr)
        return 2
    if open_files < 4 * streams + 256:  # mitmroute: client, relay (2) and upstream per stream
        print(f"note: RLIMIT_NOFILE is {open_files}: too few for {streams} streams",
              file=sys.stderr)
    wanted = set(args.only or names)
    lite_py = args.litellm_python or (None if args.smoke else sys.executable)
    if not wanted & {"chat-c1", "chat-c8", "stream", "fallback"}:
        lite_py = None  # no scenario of this run would use it
    lite_version = litellm_version(lite_py) if lite_py else None
    if lite_version is None:
        print(f"note: LiteLLM skipped: {lite_py or '(smoke or --only)'} cannot import "
              "litellm.proxy (give --litellm-python with a venv that has litellm[proxy])",
              file=sys.stderr)
    plan = [sc for sc in scenarios(lite_version is not None, streams, chunks, args.gap_ms)
            if sc.name in wanted]
    request_plan = [sc for sc in plan if not sc.streams]
    streams_scenario = next((sc for sc in plan if sc.streams), None)
    sizes = {sc.name: requests for sc in plan}
    sizes["soak"] = args.soak or (200 if args.smoke else 20_000)
    needed = {"fake"} | {t for sc in plan for t in sc.targets}
    namespace, started = f"bench-{secrets.token_hex(4)}", time.time()
    with tempfile.TemporaryDirectory(prefix="mitmroute-bench-") as tmpdir:
        tmp = Path(tmpdir)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "ca_bundle.py"), "--confdir",
                        str(tmp), "--out", str(tmp / "bundle.pem")], check=True,
                       stdout=subprocess.DEVNULL)
        services = {name: s for name, s in make_services(
            tmp, free_port(), namespace, lite_py if lite_version else None, args.stream_gap_ms,
            streams_scenario.model if streams_scenario else None).items() if name in needed}
        try:
            for s in services.values():
                s.start()
            for s in services.values():
                s.wait_ready(120 if s.name == "litellm" else 30)
            results, baseline = ({}, {name: s.stats() for name, s in services.items()})
            if request_plan:
                results, baseline = asyncio.run(run_load(services, tmp / "bundle.pem",
                                                         request_plan, sizes, rounds))
            # measured before the streams, whose connections would hide the requests' figures
            ends = {name: s.stats() for name, s in services.items() if name != "fake"}
            processes = {name: {"pid": s.proc and s.proc.pid, "peak_rss_kb": ends[name]["VmHWM"],
                                "start_rss_kb": baseline[name]["VmRSS"],
                                "end_rss_kb": ends[name]["VmRSS"],
                                "start_rss_own_kb": baseline[name]["own_VmRSS"],
                                "end_rss_own_kb": ends[name]["own_VmRSS"]}
                         for name, s in services.items() if name != "fake"}
            stream_results = (asyncio.run(run_streams(services, tmp / "bundle.pem",
                                                      streams_scenario, chunks, args.gap_ms,
                                                      ramp_ms, stream_rounds))
                              if streams_scenario else None)
        finally:
            for s in reversed(services.values()):
                s.stop()
            if args.keep_logs:
                (args.out / "logs").mkdir(parents=True, exist_ok=True)
                for s in services.values():
                    with contextlib.suppress(OSError):
                        shutil.copy(s.log, args.out / "logs" / s.log.name)
            with contextlib.suppress(Exception):
                import redis

                client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2)
                if keys := list(client.scan_iter(f"{namespace}:*")):
                    client.delete(*keys)
    for p in processes.values():
        p["growth"] = (p["end_rss_kb"] - p["start_rss_kb"]) / p["start_rss_kb"]
    summary = summarize(results, request_plan)
    if streams_scenario and stream_results:
        summary["streams"] = summarize_streams(stream_results, streams_scenario, chunks,
                                               args.gap_ms)
    checks = evaluate(summary, processes, full=not args.smoke)
    import mitmproxy.version

    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1), "smoke": args.smoke, "rounds": rounds,
            "requests_per_target": {sc.name: sizes[sc.name] for sc in request_plan},
            "streams": {"streams": streams, "chunks": chunks, "gap_ms": args.gap_ms,
                        "ramp_ms": ramp_ms,
                        "rounds": stream_rounds, "stall_ms": STALL_NS / 1e6,
                        "open_files_limit": open_files} if streams_scenario else None,
            "only": args.only, "cpus": os.cpu_count(), "litellm": lite_version,
            "python": platform.python_version(), "mitmproxy": mitmproxy.version.VERSION,
            "stream_gap_ms": args.stream_gap_ms, "mitmdump_flags": " ".join(QUIET),
            "git": git_revision()}
    md = markdown(summary, processes, checks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(
        {"meta": meta, "scenarios": summary, "processes": processes, "checks": checks}, indent=2))
    (args.out / "latest.md").write_text(md)
    chart(summary, args.out / "latest.png")
    print(md)
    for c in checks:
        print(f"{c['status']}: {c['check']} -- {c['detail']}")
    print(f"wrote {args.out}/latest.json, latest.md, latest.png in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every process was stopped on the way out
        sys.exit(130)
