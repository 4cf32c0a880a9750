#!/usr/bin/env python3
"""Requests/s of 1, 2, ... N mitmroute proxies behind HAProxy on this machine, and the shared
ledger's sustained rows/s.

    .venv/bin/python scripts/bench_scaleout.py [--proxies 3] [--requests 3000] [--rounds 3]
                                               [--concurrency 24] [--ledger-seconds 15]
                                               [--smoke] [--out bench-results]

One run starts scripts/bench.py's fast fake OpenAI backend, a PostgreSQL database of its own
(the shared ledger: `database_url`, dropped afterwards) and N proxies on one config behind one
HAProxy (tests/fleet.py: deploy/haproxy.cfg with this run's ports). For k = 1..N it lets only
the first k proxies take new connections (HAProxy's runtime API) and drives non-streamed chat
completions through the balancer at a fixed concurrency (scripts/bench.py's closed loop, new
connections each phase), in rounds with the order of k rotated; it records requests/s,
latency, and the CPU seconds the proxies, HAProxy and this client spent. Then it checks that
the ledger holds one row per request, and measures the ledger's sustained rows/s with N writer
processes (scripts/bench_ledger.py). Writes `scaleout.json` and `scaleout.md` to `--out`.
Every process it starts is stopped on exit. `--smoke` is a run of a few seconds for the tests.

Note: on a machine with fewer cores than proxies + HAProxy + client + backend, more proxies
cannot add throughput: the figures say what this machine does, not what the design allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench  # noqa: E402  (scripts/bench.py: the fake backend, the load, process stats)
import bench_ledger  # noqa: E402

from tests import pg  # noqa: E402
from tests.fleet import Fleet  # noqa: E402

CHAT = bench.Scenario("chat", "non-streamed chat completions", ["fleet"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--proxies", type=int, default=3, help="the largest fleet (default 3)")
    p.add_argument("--requests", type=int, default=3000, help="per fleet size and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--ledger-seconds", type=float, default=15.0)
    p.add_argument("--ledger-writers", type=int, help="writer processes (default: --proxies)")
    p.add_argument("--smoke", action="store_true", help="a few seconds: does it all still run")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.rounds, args.ledger_seconds, args.ledger_writers = 60, 1, 1.0, 1
    args.ledger_writers = args.ledger_writers or args.proxies
    return args


def cpu_seconds(pids: list[int]) -> float:
    return sum(bench.proc_stats(pid)["cpu"] for pid in pids)


async def phase(
    fleet: Fleet, size: int, requests: int, concurrency: int, samples: bench.Samples
) -> dict[str, float]:
    """`requests` chat completions through the balancer with only `size` proxies serving;
    the CPU seconds each part spent."""
    import aiohttp

    fleet.set_serving(size)
    serving = [i.proc.pid for i in fleet.instances[:size] if i.proc is not None]
    balancer = [fleet.balancer.proc.pid] if fleet.balancer.proc is not None else []
    ctx = ssl.create_default_context(cafile=fleet.ca_bundle)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, ssl=ctx),
        timeout=aiohttp.ClientTimeout(total=30),
    )
    client = bench.Client(
        "https://api.openai.com/v1/chat/completions", {"proxy": fleet.url, "ssl": ctx}, session
    )
    scenario = bench.Scenario(CHAT.name, CHAT.what, CHAT.targets, concurrency=concurrency)
    quiet = bench.Progress(requests)
    quiet.tty = False  # prints nothing then
    try:
        await bench.drive(client, scenario, concurrency * 2, None, quiet)  # connections, TLS
        before = cpu_seconds(serving), cpu_seconds(balancer), time.process_time()
        await bench.drive(client, scenario, requests, samples, quiet)
        after = cpu_seconds(serving), cpu_seconds(balancer), time.process_time()
    finally:
        await session.close()
    return {
        "proxies": after[0] - before[0],
        "haproxy": after[1] - before[1],
        "client": after[2] - before[2],
        "warmup_requests": concurrency * 2,
    }


def summarize(samples: bench.Samples, cpu: dict[str, float]) -> dict[str, Any]:
    lat = sorted(samples.latency)
    n = len(lat)
    return {
        "requests": n,
        "errors": samples.errors,
        "first_error": samples.first_error,
        "rps": n / samples.wall if samples.wall else 0.0,
        "p50_ms": bench.pct(lat, 50),
        "p99_ms": bench.pct(lat, 99),
        "proxies_cpu_ms_per_req": cpu["proxies"] * 1000 / n if n else None,
        "proxies_cpu_cores": cpu["proxies"] / samples.wall if samples.wall else None,
        "haproxy_cpu_ms_per_req": cpu["haproxy"] * 1000 / n if n else None,
        "client_cpu_ms_per_req": cpu["client"] * 1000 / n if n else None,
    }


def ledger_rows(fleet: Fleet, database_url: str, data_path: Path) -> tuple[int, int]:
    """Rows and distinct request ids in the fleet's shared ledger."""
    from mitmroute.spend import lake

    con = lake.connect_readonly(lake.SharedLedger.parse(database_url, str(data_path)))
    try:
        return con.execute("SELECT count(*), count(DISTINCT request_id) FROM spend_log").fetchone()
    finally:
        con.close()


def run_fleet(args: argparse.Namespace, tmp: Path, database_url: str) -> dict[str, Any]:
    fake_port = bench.free_port()
    fake = bench.Service(
        "fake",
        [sys.executable, bench.__file__, "--serve-fake", str(fake_port), "--stream-gap-ms", "0"],
        fake_port,
        tmp / "fake.log",
    )
    confdir = tmp / "confdir"
    confdir.mkdir()
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ca_bundle.py"), "--confdir", str(confdir),
         "--out", str(confdir / "bundle.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    general = {"database_url": database_url, "spend_data_path": str(tmp / "spend-data")}
    config = bench.bench_config(f"http://127.0.0.1:{fake_port}", general, None, None)
    fleet = Fleet(config, args.proxies, confdir, tmp / "fleet", quiet=True)
    sizes = list(range(1, args.proxies + 1))
    samples = {k: bench.Samples() for k in sizes}
    cpu = {k: {"proxies": 0.0, "haproxy": 0.0, "client": 0.0} for k in sizes}
    sent = 0
    try:
        fake.start()
        fake.wait_ready(30)
        t0 = time.monotonic()
        fleet.start(timeout=60)
        started_s = time.monotonic() - t0
        for r in range(args.rounds):
            for k in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
                print(f"[scaleout] round {r + 1}/{args.rounds}: {k} proxies", file=sys.stderr)
                spent = asyncio.run(phase(fleet, k, args.requests, args.concurrency, samples[k]))
                sent += args.requests + int(spent.pop("warmup_requests"))
                for part, seconds in spent.items():
                    cpu[k][part] += seconds
        codes = fleet.stop()  # SIGTERM: each flushes its rows
        rows, distinct = ledger_rows(fleet, database_url, tmp / "spend-data")
    finally:
        fleet.stop()
        fake.stop()
    results = {str(k): summarize(samples[k], cpu[k]) for k in sizes}
    base = results["1"]["rps"]
    for row in results.values():
        row["vs_one"] = row["rps"] / base if base else None
    errors = sum(s.errors for s in samples.values())
    return {
        "fleet": results,
        "fleet_start_s": started_s,
        "exit_codes": codes,
        "ledger_check": {"requests": sent, "errors": errors, "rows": rows, "distinct": distinct},
    }


def run_ledger(args: argparse.Namespace) -> dict[str, Any]:
    writers, seconds = args.ledger_writers, args.ledger_seconds
    print(f"[scaleout] ledger: {writers} writers, {seconds}s", file=sys.stderr)
    ledger_args = bench_ledger.parser().parse_args(
        ["--writers", str(writers), "--seconds", str(seconds)]
    )
    return bench_ledger.measure(ledger_args)


def markdown(report: dict[str, Any]) -> str:
    meta, check = report["meta"], report["ledger_check"]
    lines = [
        f"Scale-out on {meta['cpus']} cores (load average {meta['load_before']} before, "
        f"{meta['load_after']} after), concurrency {meta['concurrency']}, "
        f"{meta['requests']} requests x {meta['rounds']} rounds per fleet size"
        + (" (smoke run: not a measurement)" if meta["smoke"] else ""),
        "",
        "| proxies | req/s | vs 1 | p50 ms | p99 ms | errors | proxies' CPU ms/req "
        "| proxies' cores busy | HAProxy CPU ms/req | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in report["fleet"].items():
        lines.append(
            f"| {k} | {r['rps']:.0f} | {r['vs_one']:.2f}x | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r['proxies_cpu_ms_per_req']:.2f} | "
            f"{r['proxies_cpu_cores']:.2f} | {r['haproxy_cpu_ms_per_req']:.3f} | "
            f"{r['client_cpu_ms_per_req']:.2f} |"
        )
    ledger = report["ledger"]
    lines += [
        "",
        f"Shared ledger during the load: {check['rows']:,} rows for {check['requests']:,} "
        f"requests ({check['errors']} errors), {check['rows'] - check['distinct']} doubled.",
        "",
        f"Ledger alone (scripts/bench_ledger.py, {ledger['writers']} writer processes, "
        f"{ledger['seconds']} s): {ledger['rows_per_s']:,} rows/s sustained, "
        f"{ledger['lost']} lost, {ledger['doubled']} doubled.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="mitmroute-scaleout-"))
    dbname = f"mitmroute_bench_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {dbname}")
    try:
        report: dict[str, Any] = run_fleet(args, tmp, f"{pg.SERVER}/{dbname}")
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
    report["ledger"] = run_ledger(args)
    report["meta"] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "smoke": args.smoke,
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 1),
        "load_after": round(os.getloadavg()[0], 1),
        "proxies": args.proxies,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "rounds": args.rounds,
        "git": bench.git_revision(),
    }
    md = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout.json").write_text(json.dumps(report, indent=2))
    (args.out / "scaleout.md").write_text(md)
    print(md)
    print(f"wrote {args.out}/scaleout.json, scaleout.md in {time.time() - started:.0f}s")
    check = report["ledger_check"]
    once = check["rows"] == check["distinct"] == check["requests"]
    return 0 if (once or check["errors"]) and not any(report["exit_codes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
