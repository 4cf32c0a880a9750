#!/usr/bin/env python3
"""Where a routed request's CPU and the proxy's memory go, A/B against bare mitmdump.

    .venv/bin/python scripts/profile_hotpath.py [--requests N] [--rounds R] [--cprofile]
                                                [--memory] [--out DIR]

Starts `scripts/bench.py`'s fake OpenAI backend, a bare mitmdump (the host rewrite only) and
mitmroute (spend log on, no cache), drives the same requests through each at concurrency 1,
chat and streamed, the targets interleaved over rounds, and prints the proxy process's CPU
(utime + stime from /proc) per request and its RSS. That is repeatable enough on a busy machine
because it counts the proxy's own CPU, not the wall clock. A streamed answer's chunks come
`--stream-gap-ms` apart (1 ms, as in bench.py's stream scenario; 60 ms under `--callgrind`), so
that each reaches the proxy in a read of its own, as a real model's tokens do.

`--cprofile` runs mitmroute's event loop under cProfile (scripts/profile_addon.py) and prints
self time per component (mitmroute module, library, mitmproxy) in µs per request; `--memory`
runs it with tracemalloc and prints the top allocation sites after the load. Both slow the
proxy: their CPU figures are for shares, not for the ratio to bare.

`--split` also prints, per target and kind, the proxy process's user and system CPU per request
by thread (from /proc/PID/task/*/stat), so kernel time and other threads show apart from the
event loop's own. `--strace` (one round, after the timed ones) counts the syscalls each proxy
process makes per request, all threads, with `strace -c -f`: strace slows the proxy, so only
its counts are figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pstats
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)

KEY = "sk-profile-0123456789abcdef"
KINDS = ("chat", "stream")
OUT_DIR = Path(tempfile.gettempdir())


def services(tmp: Path, args: argparse.Namespace) -> dict[str, bench.Service]:
    import yaml

    fake_port = bench.free_port()
    backend = f"http://127.0.0.1:{fake_port}"
    out = {
        "fake": bench.Service(
            "fake",
            [
                sys.executable,
                str(ROOT / "scripts" / "bench.py"),
                "--serve-fake",
                str(fake_port),
                "--stream-gap-ms",
                str(args.stream_gap_ms),
            ],
            fake_port,
            tmp / "fake.log",
        )
    }

    def mitmdump(name: str, scripts: list[str], *options: str, env: dict | None = None) -> None:
        port = bench.free_port()
        argv = [bench.MITMDUMP]
        if args.callgrind:  # instruction counts: repeatable on a busy machine, ~50x slower
            argv = [
                "valgrind",
                "--tool=callgrind",
                "--dump-instr=no",
                "--collect-systime=no",
                "--separate-threads=yes",
                f"--callgrind-out-file={args.out / name}.callgrind.%p",
                *argv,
            ]
        for script in scripts:
            argv += ["-s", script]
        for option in options:
            argv += ["--set", option]
        argv += [
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(port),
            "--set",
            f"confdir={tmp}",
            *bench.QUIET,
        ]
        out[name] = bench.Service(name, argv, port, tmp / f"{name}.log", env or {})

    config = bench.bench_config(backend, {"spend_db": str(tmp / "spend.duckdb")}, None, None)
    (tmp / "mitmroute.yaml").write_text(yaml.safe_dump(config))
    targets = {
        "bare": (
            ROOT,
            [str(ROOT / "scripts" / "bench_rewrite_addon.py")],
            [f"bench_upstream={backend}", "connection_strategy=lazy"],
        ),
        "mitmroute": (
            ROOT,
            [str(ROOT / "addons" / "router.py")],
            [f"router_config={tmp / 'mitmroute.yaml'}"],
        ),
    }
    if args.baseline:  # the same config through another checkout: A/B of a change
        targets["baseline"] = (
            args.baseline,
            [str(args.baseline / "addons" / "router.py")],
            [f"router_config={tmp / 'mitmroute.yaml'}"],
        )
    for name, (root, scripts, options) in targets.items():
        env: dict[str, str] = {"PYTHONPATH": str(root)}
        if args.cprofile or args.memory:
            scripts.insert(0, str(ROOT / "scripts" / "profile_addon.py"))
            options += [
                f"profile_out={args.out / name}",
                f"profile_cpu={str(args.cprofile).lower()}",
                f"profile_memory={str(args.memory).lower()}",
            ]
            if args.memory:
                env["PYTHONTRACEMALLOC"] = "1"
        mitmdump(name, scripts, *options, env=env)
    return out


async def drive(
    session, url: str, kwargs: dict, stream: bool, n: int, ttfc: list[float] | None = None
) -> int:
    """n requests one at a time; the number that failed. Each stream's time to its first
    chunk (ms) goes to `ttfc`."""
    body = json.dumps(
        {
            "model": "bench",
            "stream": stream,
            "messages": [{"role": "user", "content": "echo the quick fox"}],
        }
    )
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    failed = 0
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=headers, **kwargs) as resp:
            if stream and ttfc is not None:
                data = await resp.content.readany()
                ttfc.append((time.perf_counter() - t0) * 1000)
                data += await resp.read()
            else:
                data = await resp.read()
            ok = resp.status == 200 and (
                data.rstrip().endswith(b"[DONE]") if stream else b'"choices"' in data
            )
            failed += not ok
    return failed


async def load(procs: dict[str, bench.Service], bundle: Path, args: argparse.Namespace) -> dict:
    import aiohttp

    ctx = ssl.create_default_context(cafile=str(bundle))
    targets = [t for t in procs if t != "fake"]
    cpu: dict[tuple[str, str], list[float]] = {(t, k): [] for t in targets for k in KINDS}
    loop: dict[tuple[str, str], list[float]] = {(t, k): [] for t in targets for k in KINDS}
    split: dict[tuple[str, str], dict[str, list[float]]] = {
        (t, k): {} for t in targets for k in KINDS
    }
    ttfc: dict[str, list[float]] = {t: [] for t in targets}
    failed = 0
    rss: dict[str, list[float]] = {t: [] for t in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4, ssl=ctx)) as session:
        url = "https://api.openai.com/v1/chat/completions"

        def kw(t: str) -> dict:
            return {"proxy": f"http://127.0.0.1:{procs[t].port}", "ssl": ctx}

        for t in targets:  # warm-up: connections, certificates, first-use imports
            for stream in (False, True):
                failed += await drive(session, url, kw(t), stream, 50)
            rss[t].append(procs[t].stats()["VmRSS"] / 1024)
        if args.callgrind:
            for t in targets:
                for kind in KINDS:
                    instructions = callgrind_zero(procs[t])
                    failed += await drive(session, url, kw(t), kind == "stream", args.requests)
                    instructions, main = callgrind_total(procs[t])
                    cpu[t, kind].append(instructions / args.requests / 1000)
                    loop[t, kind].append(main / args.requests / 1000)
            return {
                "instructions_k": {f"{t}/{k}": v for (t, k), v in cpu.items()},
                "event_loop_instructions_k": {f"{t}/{k}": v for (t, k), v in loop.items()},
                "rss_mb": rss,
                "failed": failed,
                "requests": args.requests,
            }
        for r in range(args.rounds):
            for t in targets[r % len(targets) :] + targets[: r % len(targets)]:
                for kind in KINDS:
                    before, threads = procs[t].stats()["cpu"], thread_times(procs[t].proc.pid)
                    stream = kind == "stream"
                    failed += await drive(session, url, kw(t), stream, args.requests, ttfc[t])
                    used = procs[t].stats()["cpu"] - before
                    cpu[t, kind].append(used * 1e6 / args.requests)
                    after = thread_times(procs[t].proc.pid)
                    for key, times in after.items():
                        was = threads.get(key, (0.0, 0.0))
                        for what, now, then in zip(("user", "sys"), times, was, strict=True):
                            per = (now - then) * 1e6 / args.requests
                            split[t, kind].setdefault(f"{key} {what}", []).append(per)
                rss[t].append(procs[t].stats()["VmRSS"] / 1024)
        syscalls: dict[str, dict[str, float]] = {}
        if args.strace:
            for t in targets:
                syscalls[f"{t}/stream"] = await strace_counts(
                    procs[t], lambda t=t: drive(session, url, kw(t), True, args.requests)
                )
    return {
        "ttfc_ms": ttfc,
        "split_us": {
            f"{t}/{k}": {name: median(v) for name, v in by.items()} for (t, k), by in split.items()
        },
        "syscalls_per_request": syscalls,
        "cpu_us": {f"{t}/{k}": v for (t, k), v in cpu.items()},
        "rss_mb": rss,
        "failed": failed,
        "requests": args.requests * args.rounds,
    }


def _threads(pid: int) -> list[tuple[str, str, float, float]]:
    """(name, tid, user s, system s) of each thread of `pid` (threads gone meanwhile skipped)."""
    out = []
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.append((name, task.name, int(fields[11]) / tick, int(fields[12]) / tick))
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of `pid`, by `name:tid` (the event loop is the process's own tid)."""
    return {f"{name}:{tid}": user + system for name, tid, user, system in _threads(pid)}


def thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds per thread of `pid`: `loop` (the main thread, where mitmproxy's
    event loop runs), else `name:tid`."""
    return {
        "loop" if tid == str(pid) else f"{name}:{tid}": (user, system)
        for name, tid, user, system in _threads(pid)
    }


async def strace_counts(service: bench.Service, load) -> dict[str, float]:
    """Syscalls per request of `service`'s process (all threads) while `load()` runs, by name."""
    assert service.proc is not None
    out = OUT_DIR / f"{service.name}.strace"
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-q", "-o", str(out), "-p", str(service.proc.pid)],
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(1.0)  # strace attaches to every thread
        failed = await load()
    finally:
        tracer.send_signal(2)
        tracer.wait(30)
    requests = STRACE_REQUESTS[0]
    counts: dict[str, float] = {"failed": float(failed)}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3]) / requests
    counts["total"] = sum(v for k, v in counts.items() if k != "failed")
    return counts


STRACE_REQUESTS = [100]


def callgrind_zero(service: bench.Service) -> None:
    assert service.proc is not None
    subprocess.run(
        ["callgrind_control", "-z", str(service.proc.pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def callgrind_total(service: bench.Service) -> tuple[int, int]:
    """Instructions executed since the last zero: in all threads, and in the main thread (the
    event loop), from a fresh dump's `totals:` lines (one file per thread)."""
    assert service.proc is not None
    subprocess.run(
        ["callgrind_control", "-d", str(service.proc.pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    files = list(OUT_DIR.glob(f"*.callgrind.{service.proc.pid}.*"))
    part = max(files, key=lambda p: p.stat().st_mtime).name.rsplit(".", 1)[1].split("-")[0]
    total = main = 0
    for path in files:
        name = path.name.rsplit(".", 1)[1]
        if name.split("-")[0] != part:
            continue
        for line in path.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                count = int(line.split()[1])
                total += count
                main += count if name.endswith("-01") else 0
                break
    if not total:
        raise RuntimeError(f"no totals for part {part} of {service.name}")
    return total, main


def component(filename: str) -> str:
    """A name for the part of the stack a function's file belongs to."""
    path = filename.replace("\\", "/")
    if "/mitmroute/" in path and "site-packages" not in path:
        rel = path.split("/mitmroute/", 1)[1].removesuffix(".py")
        return "mitmroute." + rel.replace("/", ".")
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if path.startswith("~") or path.startswith("<"):
        return "builtins"
    if "/lib/python3" in path:
        rest = path.split("/lib/python3", 1)[1].split("/", 1)[1]
        return "stdlib." + rest.split("/", 1)[0].removesuffix(".py")
    return path


IDLE = {"<method 'poll' of 'select.epoll' objects>", "<method 'acquire' of '_thread.lock' objects>"}
"""Waiting, not working: cProfile's clock is the wall clock."""


def self_times(path: Path) -> dict[str, float]:
    """Seconds of self time per component, idle waits left out."""
    own: dict[str, float] = {}
    stats = pstats.Stats(str(path))
    for (filename, _, func), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func not in IDLE:
            name = component(filename)
            own[name] = own.get(name, 0.0) + tottime
    return own


def cprofile_table(out: Path, n: int, top: int) -> str:
    bare, own = self_times(out / "bare.pstats"), self_times(out / "mitmroute.pstats")
    total_bare, total = sum(bare.values()), sum(own.values())
    lines = [
        f"self time by component, µs per request ({n} requests; profiled, so slower): "
        f"bare {total_bare * 1e6 / n:.0f}, mitmroute {total * 1e6 / n:.0f}",
        "     bare  mitmroute      +  component",
    ]
    names = sorted(set(own) | set(bare), key=lambda k: -abs(own.get(k, 0) - bare.get(k, 0)))
    for name in names[:top]:
        b, m = bare.get(name, 0.0) * 1e6 / n, own.get(name, 0.0) * 1e6 / n
        lines.append(f"{b:9.1f}  {m:9.1f} {m - b:+7.1f}  {name}")
    stats = pstats.Stats(str(out / "mitmroute.pstats"))
    lines.append("\ncumulative, mitmroute hooks and hot functions, µs per request")
    hot = []
    for (filename, line, func), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/mitmroute/" in filename and "site-packages" not in filename:
            hot.append((cum, f"{component(filename)}:{line} {func}"))
    for cum, name in sorted(hot, reverse=True)[:top]:
        lines.append(f"{cum * 1e6 / n:9.1f}  {name}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100, help="per kind, target and round")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--top", type=int, default=40)
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions (valgrind) instead of CPU time; one round",
    )
    p.add_argument(
        "--stream-gap-ms",
        type=float,
        help="the fake's gap between chunks (default 1, as bench.py's stream scenario; 60 with "
        "--callgrind, so that the chunks still reach the ~50x slower proxy one by one: at 0 "
        "they coalesce into one read and the per-chunk cost does not show)",
    )
    p.add_argument("--split", action="store_true", help="user/system CPU by thread")
    p.add_argument("--strace", action="store_true", help="syscalls per streamed request")
    p.add_argument("--baseline", type=Path, help="another checkout (e.g. /work/main) to A/B")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "profile-hotpath")
    args = p.parse_args()
    STRACE_REQUESTS[0] = args.requests
    if args.stream_gap_ms is None:
        args.stream_gap_ms = 60.0 if args.callgrind else 1.0
    args.out.mkdir(parents=True, exist_ok=True)
    global OUT_DIR
    OUT_DIR = args.out
    with tempfile.TemporaryDirectory(prefix="mitmroute-profile-") as tmpdir:
        tmp = Path(tmpdir)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "ca_bundle.py"),
                "--confdir",
                str(tmp),
                "--out",
                str(tmp / "bundle.pem"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        procs = services(tmp, args)
        try:
            for s in procs.values():
                s.start()
            for s in procs.values():
                s.wait_ready(300 if args.callgrind else 60)
            started = {t: procs[t].stats() for t in procs if t != "fake"}
            result = asyncio.run(load(procs, tmp / "bundle.pem", args))
            result["threads_cpu_s"] = {
                t: thread_cpu(procs[t].proc.pid) for t in started if procs[t].proc
            }
            result["rss_at_start_mb"] = {t: s["VmRSS"] / 1024 for t, s in started.items()}
            result["peak_rss_mb"] = {t: procs[t].stats()["VmHWM"] / 1024 for t in started}
        finally:
            for s in reversed(procs.values()):
                s.stop()
    if args.callgrind:
        print(
            f"{result['requests']} requests per kind and target; thousands of instructions "
            "per request: all threads (the spend writer's flushes are per 0.9 s of wall time, "
            "so under valgrind's ~50x slowdown they weigh ~50x more per request than at full "
            "speed), then the event loop alone"
        )
        for which in ("instructions_k", "event_loop_instructions_k"):
            counts = result[which]
            for kind in KINDS:
                bare = counts[f"bare/{kind}"][0]
                for t in (t for t in procs if t not in {"fake", "bare"}):
                    mr = counts[f"{t}/{kind}"][0]
                    print(
                        f"{'loop ' if which.startswith('event') else 'all  '}{kind:6s} "
                        f"bare {bare:8.0f}  {t} {mr:8.0f} = {mr / bare:.3f}x ({mr - bare:+.0f})"
                    )
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        return 0
    cpu = result["cpu_us"]
    print(
        f"{result['requests']} requests per kind and target, {result['failed']} failed; "
        "CPU µs/request: median of the rounds [min..max]; ratio: median of per-round ratios"
    )
    for kind in KINDS:
        for t in (t for t in procs if t not in {"fake", "bare"}):
            bare, mr = cpu[f"bare/{kind}"], cpu[f"{t}/{kind}"]
            ratios = [m / b for m, b in zip(mr, bare, strict=True)]
            print(
                f"{kind:6s} bare {median(bare):6.0f} [{min(bare):.0f}..{max(bare):.0f}]  "
                f"{t} {median(mr):6.0f} [{min(mr):.0f}..{max(mr):.0f}]  "
                f"= {median(ratios):.2f}x (+{median(mr) - median(bare):.0f})"
            )
    for t in (t for t in procs if t != "fake"):
        times = sorted(result["ttfc_ms"][t])
        print(
            f"{t:10s} time to first chunk ms: p50 {median(times):.2f}, "
            f"p90 {times[int(len(times) * 0.9)]:.2f}"
        )
    for t in (t for t in procs if t != "fake"):
        print(
            f"{t:10s} RSS MB at start {result['rss_at_start_mb'][t]:.1f}, after warm-up and "
            f"rounds {' '.join(f'{x:.1f}' for x in result['rss_mb'][t])}, "
            f"peak {result['peak_rss_mb'][t]:.1f}"
        )
    if args.split:
        for key, by in result["split_us"].items():
            busy = sorted(by.items(), key=lambda kv: -kv[1])
            print(
                f"{key:18s} µs/request by thread: "
                + ", ".join(f"{name} {v:.0f}" for name, v in busy if v >= 5)
            )
    for key, counts in result.get("syscalls_per_request", {}).items():
        top = sorted(
            ((k, v) for k, v in counts.items() if k not in {"failed", "total"}),
            key=lambda kv: -kv[1],
        )[:12]
        print(
            f"{key:18s} syscalls/request {counts['total']:.1f}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in top)
        )
    for t, threads in result.get("threads_cpu_s", {}).items():
        busy = sorted(threads.items(), key=lambda kv: -kv[1])[:6]
        print(f"{t:10s} CPU s by thread: " + ", ".join(f"{k} {v:.2f}" for k, v in busy))
    time.sleep(0.5)
    if args.cprofile:
        n = result["requests"] * 2 + 100  # chat + stream, with the warm-up
        print()
        print(cprofile_table(args.out, n, args.top))
    if args.memory and (mem := args.out / "mitmroute.mem.txt").exists():
        print()
        print("\n".join(mem.read_text().splitlines()[: args.top + 1]))
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
