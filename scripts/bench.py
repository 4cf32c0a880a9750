#!/usr/bin/env python3
"""Benchmark mitmroute against bare mitmdump, a direct connection and (optionally) LiteLLM.

    .venv/bin/python scripts/bench.py [--requests N] [--rounds R] [--smoke] [--out DIR]
                                      [--litellm-python /path/to/venv/bin/python]

One run starts a fast fake OpenAI backend, mitmroute (plain, with a local cache, with a Redis
cache), a bare mitmdump that only rewrites the host (scripts/bench_rewrite_addon.py) and LiteLLM
when its python can import `litellm.proxy`; drives the same closed-loop load through each, with
targets interleaved over several rounds; and writes `latest.json`, `latest.md` and `latest.png`
to `--out` (default bench-results/). Every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
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
PROXIED = {"bare", "mitmroute", "mr-cache-local", "mr-cache-redis"}


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
                           if h.lower().startswith("content-length:")), 0)  # fmt: skip
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + length], self.buf[end + 4 + length :]
            self.answer(head[0].split(" ")[1], body)

    def send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.transport.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%b" % (status, len(data), data))  # fmt: skip

    def answer(self, path: str, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        model = str(body.get("model", ""))
        if not path.endswith("/chat/completions"):
            return self.send(404, {"error": {"message": "not found", "type": "invalid_request"}})
        if model.startswith("fail-"):
            return self.send(500, {"error": {"message": "fake failure", "type": "server_error"}})
        base = {"id": f"chatcmpl-{secrets.token_hex(6)}", "created": int(time.time()),
                "model": model}  # fmt: skip
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "echo: the quick fox"}
            return self.send(200, {**base, "object": "chat.completion", "usage": usage,
                                   "choices": [{"index": 0, "message": message,
                                                "finish_reason": "stop"}]})  # fmt: skip
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        deltas = [{"role": "assistant", "content": ""}, {"content": "echo:"},
                  {"content": " the"}, {"content": " quick"}, {"content": " fox"}, {}]  # fmt: skip
        events = [{**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": d, "finish_reason": None if d else "stop"}]} for d in deltas]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage})  # fmt: skip
        frames = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
        frames += [b"data: [DONE]\n\n", b""]
        loop = asyncio.get_running_loop()
        for i, frame in enumerate(frames):
            chunk = b"%x\r\n%b\r\n" % (len(frame), frame)
            loop.call_later(i * self.gap, self.transport.write, chunk)


def serve_fake(port: int, gap_ms: float) -> None:
    FakeOpenAI.gap = gap_ms / 1000

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(FakeOpenAI, "127.0.0.1", port)
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# --- 2-4. the processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid: int, field_name: str) -> int:
    """VmRSS / VmHWM (kB) of `pid` plus its descendants (LiteLLM may fork workers)."""
    pids, total = {pid}, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.add(int(stat.parent.name))
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1])
    return total


@dataclass
class Service:
    name: str
    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> Service:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, cwd=self.log.parent,
                                         start_new_session=True)  # fmt: skip
        return self

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")  # fmt: skip
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not listening on {self.port} after {timeout:.0f}s")

    def kb(self, field_name: str) -> int:
        return proc_kb(self.proc.pid, field_name) if self.proc else 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: it and its children
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def bench_config(backend: str, tmp: Path, name: str, cache: dict | None) -> dict[str, Any]:
    def dep(group: str, model: str) -> dict[str, Any]:
        return {"model_name": group, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{backend}/v1", "api_key": "sk-fake"}}

    config: dict[str, Any] = {
        "model_list": [dep("bench", "bench-model"), dep("flaky", "fail-500")],
        # every fallback request pays for the failing attempt: no cooldown, no retry
        "router_settings": {"fallbacks": [{"flaky": ["bench"]}], "num_retries": 0,
                            "allowed_fails": 1_000_000},  # fmt: skip
        "general_settings": {"spend_db": str(tmp / f"spend-{name}.duckdb")},
    }
    if cache is not None:
        config["litellm_settings"] = {"cache": True, "cache_params": cache}
    return config


def litellm_check(python: str) -> str | None:
    """LiteLLM's version when `python` can run its proxy, else None."""
    code = "import litellm.proxy.proxy_server, importlib.metadata as m; print(m.version('litellm'))"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})  # fmt: skip
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[-1]
    return None


def make_services(tmp: Path, backend: str, namespace: str, litellm_python: str | None,
                  gap_ms: float) -> dict[str, Service]:  # fmt: skip
    import yaml

    fake_port = int(backend.rsplit(":", 1)[1])
    services = {"fake": Service("fake", [sys.executable, __file__, "--serve-fake", str(fake_port),
                                         "--stream-gap-ms", str(gap_ms)],
                                fake_port, tmp / "fake.log")}  # fmt: skip
    caches = {"mitmroute": None, "mr-cache-local": {"type": "local"},
              "mr-cache-redis": {"type": "redis", "host": "127.0.0.1", "port": 6379,
                                 "namespace": namespace}}  # fmt: skip
    for name, cache in caches.items():
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(bench_config(backend, tmp, name, cache)))
        port = free_port()
        services[name] = Service(name, [MITMDUMP, "--listen-host", "127.0.0.1", "-p", str(port),
                                        "--set", f"confdir={tmp}", *QUIET,
                                        "-s", str(ROOT / "addons" / "router.py"),
                                        "--set", f"router_config={cfg}"],
                                 port, tmp / f"{name}.log")  # fmt: skip
    port = free_port()
    services["bare"] = Service("bare", [MITMDUMP, "--listen-host", "127.0.0.1", "-p", str(port),
                                        "--set", f"confdir={tmp}", *QUIET, "-s",
                                        str(ROOT / "scripts" / "bench_rewrite_addon.py"),
                                        "--set", f"bench_upstream={backend}",
                                        "--set", "connection_strategy=lazy"],
                               port, tmp / "bare.log")  # fmt: skip
    if litellm_python:
        cfg = tmp / "litellm.yaml"
        config = bench_config(backend, tmp, "litellm", None)
        del config["general_settings"]  # LiteLLM's spend log needs Postgres; none here
        cfg.write_text(yaml.safe_dump(config))
        port = free_port()
        services["litellm"] = Service(
            "litellm", [litellm_python, "-c", "from litellm.proxy.proxy_cli import run_server; "
                        "run_server()", "--config", str(cfg), "--host", "127.0.0.1",
                        "--port", str(port), "--num_workers", "1"],
            port, tmp / "litellm.log",
            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                 "LITELLM_TELEMETRY": "False", "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"})  # fmt: skip
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


@dataclass
class Samples:
    latency: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    hit_latency: list[float] = field(default_factory=list)
    errors: int = 0
    hits: int = 0
    wall: float = 0.0
    round_p50: list[float] = field(default_factory=list)
    rss_kb: list[tuple[int, int]] = field(default_factory=list)  # (requests so far, VmRSS)


def scenarios(litellm: bool, soak_targets: list[str]) -> list[Scenario]:
    base = ["direct", "bare", "mitmroute"] + (["litellm"] if litellm else [])
    return [
        Scenario("chat-c1", "non-streamed, concurrency 1", base),
        Scenario("chat-c8", "non-streamed, concurrency 8", base, concurrency=8),
        Scenario("stream", "streamed (6 chunks + usage), concurrency 1", base, stream_every=1),
        Scenario("cache-local", "same request repeatedly, local cache",
                 ["direct", "bare", "mr-cache-local"]),  # fmt: skip
        Scenario("cache-redis", "same request repeatedly, Redis cache",
                 ["direct", "bare", "mr-cache-redis"]),  # fmt: skip
        Scenario("fallback", "group `flaky` (fail-500) falls back to `bench`; "
                 "direct/bare send it straight to the backend", base, model="flaky"),  # fmt: skip
        Scenario("soak", "RSS: non-streamed + every 4th streamed, concurrency 8", soak_targets,
                 concurrency=8, stream_every=4),  # fmt: skip
    ]


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.shown, self.t0 = total, 0, 0.0, time.monotonic()
        self.label, self.tty = "", sys.stderr.isatty()

    def step(self, label: str | None = None) -> None:
        if label is not None:
            self.label = label
            if not self.tty:
                print(f"[bench] {100 * self.done / self.total:3.0f}% {label}", file=sys.stderr)
        else:
            self.done += 1
        now = time.monotonic()
        if self.tty and (label is not None or now - self.shown > 0.2):
            self.shown = now
            bar = "#" * int(30 * self.done / self.total)
            print(f"\r[{bar:<30}] {100 * self.done / self.total:3.0f}% {now - self.t0:5.0f}s "
                  f"{self.label:<42}", end="", file=sys.stderr, flush=True)  # fmt: skip


@dataclass
class Client:
    url: str
    kwargs: dict[str, Any]
    session: Any


async def drive(client: Client, sc: Scenario, n: int, out: Samples | None,
                progress: Progress | None) -> None:  # fmt: skip
    """n requests, `sc.concurrency` at a time, closed loop; samples go to `out` (None: warm-up)."""
    import aiohttp

    messages = [{"role": "user", "content": "echo the quick fox"}]
    bodies = [json.dumps({"model": sc.model, "messages": messages, "stream": s}).encode()
              for s in (False, True)]  # fmt: skip
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    left, done, latencies = n, 0, []

    async def one(stream: bool) -> None:
        nonlocal done
        t0 = time.perf_counter()
        first, tail = 0.0, b""
        try:
            async with client.session.post(client.url, data=bodies[stream], headers=headers,
                                           **client.kwargs) as resp:  # fmt: skip
                if stream:
                    async for data in resp.content.iter_any():
                        if not first and data:
                            first = time.perf_counter()
                        tail = data
                    ok = resp.status == 200 and tail.rstrip().endswith(b"[DONE]")
                else:
                    ok = resp.status == 200 and b'"choices"' in await resp.read()
                hit = resp.headers.get("x-mitmroute-cache", "").upper().startswith("HIT")
        except (aiohttp.ClientError, TimeoutError):
            ok = hit = False
        elapsed = (time.perf_counter() - t0) * 1000
        if out is not None:
            if not ok:
                out.errors += 1
            out.latency.append(elapsed)
            latencies.append(elapsed)
            if first:
                out.ttfc.append((first - t0) * 1000)
            if hit:
                out.hits += 1
                out.hit_latency.append(elapsed)
            if progress is not None:
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
                   per_target: int, soak: int, rounds: int) -> dict[str, dict[str, Samples]]:  # fmt: skip
    import aiohttp

    ctx = ssl.create_default_context(cafile=str(bundle))
    clients: dict[str, Client] = {}
    fake = f"http://127.0.0.1:{services['fake'].port}/v1/chat/completions"
    targets = {t for sc in plan for t in sc.targets}
    for t in sorted(targets):
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16, ssl=ctx), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=30))  # fmt: skip
        if t in PROXIED:
            kwargs = {"proxy": f"http://127.0.0.1:{services[t].port}", "ssl": ctx}
            clients[t] = Client("https://api.openai.com/v1/chat/completions", kwargs, session)
        else:
            url = fake if t == "direct" else f"http://127.0.0.1:{services[t].port}/v1/chat/completions"
            clients[t] = Client(url, {}, session)
    results = {sc.name: {t: Samples() for t in sc.targets} for sc in plan}
    sizes = {sc.name: soak if sc.name == "soak" else per_target for sc in plan}
    progress = Progress(sum(sizes[sc.name] * len(sc.targets) for sc in plan))
    try:
        for sc in plan:  # warm-up: connections, TLS, leaf certificates, the cache's first miss
            for t in sc.targets:
                progress.step(f"warm-up {sc.name} -> {t}")
                await drive(clients[t], sc, 4 * sc.concurrency + 8, None, None)
        for r in range(rounds):
            for sc in plan:
                order = sc.targets[r % len(sc.targets) :] + sc.targets[: r % len(sc.targets)]
                for t in order:
                    n = sizes[sc.name] // rounds + (r < sizes[sc.name] % rounds)
                    progress.step(f"round {r + 1}/{rounds} {sc.name} -> {t}")
                    samples = results[sc.name][t]
                    if sc.name == "soak" and not samples.rss_kb and t in services:
                        samples.rss_kb.append((0, services[t].kb("VmRSS")))
                    await drive(clients[t], sc, n, samples, progress)
                    if t in services:
                        samples.rss_kb.append((len(samples.latency), services[t].kb("VmRSS")))
    finally:
        for c in clients.values():
            await c.session.close()
        print(file=sys.stderr)
    return results


# --- 7-8. statistics and report --------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(results: dict[str, dict[str, Samples]], services: dict[str, Service],
              plan: list[Scenario]) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for sc in plan:
        rows: dict[str, Any] = {}
        for t, s in results[sc.name].items():
            lat, ttfc = sorted(s.latency), sorted(s.ttfc)
            rows[t] = {
                "n": len(lat), "errors": s.errors, "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90),
                "p99_ms": pct(lat, 99), "rps": len(lat) / s.wall if s.wall else 0.0,
                "round_p50_ms": s.round_p50,
                "ttfc_p50_ms": pct(ttfc, 50) if ttfc else None,
                "ttfc_p90_ms": pct(ttfc, 90) if ttfc else None,
                "cache_hit_ratio": s.hits / len(lat) if lat else 0.0,
                "cache_hit_p50_ms": pct(sorted(s.hit_latency), 50) if s.hits else None,
                "rss_kb": s.rss_kb,
            }  # fmt: skip
        direct = rows.get("direct")
        for row in rows.values():
            row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"] if direct else None
            row["added_ttfc_p50_ms"] = (row["ttfc_p50_ms"] - direct["ttfc_p50_ms"]
                                        if direct and row["ttfc_p50_ms"] is not None else None)  # fmt: skip
        out[sc.name] = {"what": sc.what, "concurrency": sc.concurrency, "targets": rows}
    return out


def evaluate(summary: dict[str, Any], full: bool) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def row(sc: str, t: str) -> dict[str, Any] | None:
        return summary.get(sc, {}).get("targets", {}).get(t)

    def check(name: str, ok: bool | None, detail: str) -> None:
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        checks.append({"check": name, "status": status, "detail": detail})

    mr, bare = row("chat-c1", "mitmroute"), row("chat-c1", "bare")
    ratio = mr["added_p50_ms"] / bare["added_p50_ms"] if bare["added_p50_ms"] > 0 else float("inf")
    check("non-streamed added latency p50 <= 1.3x bare mitmdump's", ratio <= 1.3,
          f"mitmroute +{mr['added_p50_ms']:.2f} ms vs bare +{bare['added_p50_ms']:.2f} ms "
          f"over direct = {ratio:.2f}x")  # fmt: skip
    mr, bare, lite = row("chat-c8", "mitmroute"), row("chat-c8", "bare"), row("chat-c8", "litellm")
    check("req/s at concurrency 8 >= 0.8x bare mitmdump's", mr["rps"] >= 0.8 * bare["rps"],
          f"{mr['rps']:.0f} vs {bare['rps']:.0f} req/s = {mr['rps'] / bare['rps']:.2f}x")
    check("req/s at concurrency 8 >= 3x LiteLLM's",
          mr["rps"] >= 3 * lite["rps"] if lite else None,
          f"{mr['rps']:.0f} vs {lite['rps']:.0f} req/s = {mr['rps'] / lite['rps']:.2f}x"
          if lite else "LiteLLM not run")  # fmt: skip
    for kind in ("local", "redis"):
        cached, bare = row(f"cache-{kind}", f"mr-cache-{kind}"), row(f"cache-{kind}", "bare")
        if cached is None or bare is None:
            check(f"{kind} cache hit p50 < bare passthrough p50", None, "not run")
            continue
        hit = cached["cache_hit_p50_ms"]
        check(f"{kind} cache hit p50 < bare passthrough p50", hit is not None and
              hit < bare["p50_ms"], (f"hit p50 {hit:.2f} ms" if hit is not None else
              "no x-mitmroute-cache: HIT answers (cache not active?)") +
              f" vs bare {bare['p50_ms']:.2f} ms; HIT ratio {cached['cache_hit_ratio']:.0%}")  # fmt: skip
    mr, bare = row("stream", "mitmroute"), row("stream", "bare")
    diff = mr["ttfc_p50_ms"] - bare["ttfc_p50_ms"]
    check("time to first streamed chunk within 2 ms of bare mitmdump's", diff <= 2.0,
          f"{mr['ttfc_p50_ms']:.2f} vs {bare['ttfc_p50_ms']:.2f} ms = {diff:+.2f} ms")
    soak = row("soak", "mitmroute")
    if soak and len(soak["rss_kb"]) > 1:
        (_, before), (n, after) = soak["rss_kb"][0], soak["rss_kb"][-1]
        growth = (after - before) / before
        check(f"RSS growth < 10% across {n} requests", growth < 0.10 if full else None,
              f"{before / 1024:.1f} -> {after / 1024:.1f} MB = {growth:+.1%}"
              + ("" if full else " (smoke: not judged)"))  # fmt: skip
    return checks


def markdown(summary: dict[str, Any], processes: dict[str, Any], checks: list[dict]) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = ["| scenario | target | n | err | p50 ms | p90 ms | p99 ms | +p50 vs direct | req/s "
             "| TTFC p50 ms | +TTFC | cache HIT | peak RSS MB |", "|" + " --- |" * 13]  # fmt: skip
    for name, sc in summary.items():
        for t, r in sc["targets"].items():
            peak = processes.get(t, {}).get("peak_rss_kb")
            lines.append(f"| {name} | {t} | {r['n']} | {r['errors']} | {f(r['p50_ms'])} | "
                         f"{f(r['p90_ms'])} | {f(r['p99_ms'])} | {f(r['added_p50_ms'], '+.2f')} "
                         f"| {f(r['rps'], '.0f')} | {f(r['ttfc_p50_ms'])} | "
                         f"{f(r['added_ttfc_p50_ms'], '+.2f')} | {r['cache_hit_ratio']:.0%} | "
                         f"{f(peak and peak / 1024, '.1f')} |")  # fmt: skip
    lines += ["", "| process | peak RSS MB | RSS after warm-up MB | RSS at end MB | growth |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for t, p in processes.items():
        lines.append(f"| {t} | {p['peak_rss_kb'] / 1024:.1f} | {p['start_rss_kb'] / 1024:.1f} | "
                     f"{p['end_rss_kb'] / 1024:.1f} | {p['growth']:+.1%} |")  # fmt: skip
    lines += [""] + [f"- **{c['status']}** {c['check']}: {c['detail']}" for c in checks]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    names = [n for n in summary if n != "soak"]
    targets = sorted({t for n in names for t in summary[n]["targets"]})
    width = 0.8 / len(targets)
    for ax, key, title in ((axes[0][0], "p50_ms", "p50 latency (ms; bar top = p90)"),
                           (axes[0][1], "added_p50_ms", "p50 added over direct (ms)")):  # fmt: skip
        for i, t in enumerate(targets):
            xs = [j + i * width for j, n in enumerate(names) if t in summary[n]["targets"]]
            rows = [summary[n]["targets"][t] for n in names if t in summary[n]["targets"]]
            ax.bar(xs, [r[key] for r in rows], width, label=t)
            if key == "p50_ms":
                ax.errorbar(xs, [r["p50_ms"] for r in rows], fmt="none", ecolor="k",
                            yerr=[[0] * len(rows), [r["p90_ms"] - r["p50_ms"] for r in rows]])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    for key, label in (("chat-c8", "req/s, concurrency 8"), ("stream", "TTFC p50 ms, streamed")):
        rows = summary[key]["targets"]
        value = "rps" if key == "chat-c8" else "ttfc_p50_ms"
        ax.barh([f"{label}: {t}" for t in rows], [r[value] for r in rows])
    ax.set_title("throughput and time to first chunk")
    ax = axes[1][1]
    for t, r in summary["soak"]["targets"].items():
        ax.plot([n for n, _ in r["rss_kb"]], [kb / 1024 for _, kb in r["rss_kb"]], "o-", label=t)
    ax.set_title("soak: RSS (MB) vs requests")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, help="per target and scenario (default 2000; smoke 40)")
    p.add_argument("--soak", type=int, help="soak requests per target (default 20000; smoke 200)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; smoke 2)")
    p.add_argument("--smoke", action="store_true", help="a few dozen requests each, < 60 s")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    p.add_argument("--litellm-python", help="a python that can import litellm.proxy")
    p.add_argument("--stream-gap-ms", type=float, default=1.0, help="fake's gap between chunks")
    p.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake is not None:
        serve_fake(args.serve_fake, args.stream_gap_ms)
        return 0
    per_target = args.requests or (40 if args.smoke else 2000)
    soak = args.soak or (200 if args.smoke else 20_000)
    rounds = args.rounds or (2 if args.smoke else 5)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    litellm_python = args.litellm_python or (None if args.smoke else sys.executable)
    litellm_version = litellm_check(litellm_python) if litellm_python else None
    if litellm_version is None:
        print(f"note: LiteLLM skipped: {litellm_python or '(smoke)'} cannot import litellm.proxy"
              " (use --litellm-python PY with a venv that has litellm[proxy])", file=sys.stderr)
    namespace = f"bench-{secrets.token_hex(4)}"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mitmroute-bench-") as tmpdir:
        tmp = Path(tmpdir)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "ca_bundle.py"), "--confdir",
                        str(tmp), "--out", str(tmp / "bundle.pem")], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        backend = f"http://127.0.0.1:{free_port()}"
        services = make_services(tmp, backend, namespace,
                                 litellm_python if litellm_version else None, args.stream_gap_ms)
        plan = scenarios("litellm" in services, ["bare", "mitmroute"])
        try:
            for s in services.values():
                s.start()
            for s in services.values():
                s.wait_ready(120 if s.name == "litellm" else 30)
            results = asyncio.run(run_load(services, tmp / "bundle.pem", plan, per_target, soak,
                                           rounds))  # fmt: skip
            processes = {}
            for name, s in services.items():
                if name == "fake":
                    continue
                firsts = [r.rss_kb[0][1] for sc in results.values()
                          for t, r in sc.items() if t == name and r.rss_kb]  # fmt: skip
                start, end = (firsts[0] if firsts else 0), s.kb("VmRSS")
                processes[name] = {"pid": s.proc.pid if s.proc else None,
                                   "peak_rss_kb": s.kb("VmHWM"), "start_rss_kb": start,
                                   "end_rss_kb": end,
                                   "growth": (end - start) / start if start else 0.0}  # fmt: skip
        finally:
            for s in reversed(services.values()):
                s.stop()
            with contextlib.suppress(Exception):
                import redis

                r = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2)
                keys = list(r.scan_iter(f"{namespace}*"))
                if keys:
                    r.delete(*keys)
    summary = summarize(results, services, plan)
    checks = evaluate(summary, full=not args.smoke)
    import mitmproxy.version

    report = {
        "meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                 "seconds": round(time.time() - started, 1), "smoke": args.smoke,
                 "requests_per_target": per_target, "soak_requests": soak, "rounds": rounds,
                 "cpus": os.cpu_count(), "python": platform.python_version(),
                 "mitmproxy": mitmproxy.version.VERSION, "litellm": litellm_version,
                 "redis_namespace": namespace, "stream_gap_ms": args.stream_gap_ms,
                 "mitmdump_flags": " ".join(QUIET)},
        "scenarios": summary, "processes": processes, "checks": checks,
    }  # fmt: skip
    md = markdown(summary, processes, checks)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2))
    (args.out / "latest.md").write_text(md)
    chart(summary, args.out / "latest.png")
    print(md)
    for c in checks:
        print(f"{c['status']}: {c['check']} -- {c['detail']}")
    print(f"wrote {args.out}/latest.json, latest.md, latest.png "
          f"in {time.time() - started:.0f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
