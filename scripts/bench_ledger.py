"""Sustained rows/s of the spend log writer: the local DuckDB file, or the shared ledger
(DuckLake on PostgreSQL) with 1..N writer processes appending at once.

    python scripts/bench_ledger.py --writers 3 --seconds 20            # shared (own database)
    python scripts/bench_ledger.py --local --seconds 20                # the local file
    python scripts/bench_ledger.py --design postgres --writers 3       # the alternative

`--design postgres` is the alternative the shared ledger was measured against (bench only):
plain PostgreSQL tables (a unique index on request_id) written and read through DuckDB's
postgres extension, by the same writer.

Each writer process records rows as fast as its writer thread takes them (at most `--backlog`
held in memory), for `--seconds`, then closes; the figure is rows in the ledger / elapsed.
Every row is then checked to be there exactly once. The shared mode creates a database
`mitmroute_bench_<random>` on `--pg` (trust auth) and drops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mitmroute.exchange import Attempt, Exchange, Usage


def exchange(writer: int, i: int) -> Exchange:
    started = datetime.now(UTC) - timedelta(milliseconds=300)
    return Exchange(
        request_id=f"w{writer}-{i}",
        started_at=started,
        ended_at=started + timedelta(milliseconds=250),
        endpoint="/v1/chat/completions",
        stream=i % 2 == 0,
        latency_ms=250.0,
        ttft_ms=40.0,
        api_key_hash=f"hash-{i % 50}",
        key_alias="alias",
        team=f"team-{i % 7}",
        user="u",
        requested_model="gpt-4o",
        model_group="gpt-4o",
        deployment="openai/gpt-4o",
        provider="openai",
        api_base="https://api.openai.com/v1",
        status_code=200,
        usage=Usage(prompt_tokens=100 + i % 100, completion_tokens=20, cached_tokens=i % 3),
        cost_usd=Decimal("0.00012345"),
        attempts=[
            Attempt(
                attempt=1,
                deployment="openai/gpt-4o",
                api_base="https://api.openai.com/v1",
                status_code=200,
                latency_ms=240.0,
                started_at=started,
            )
        ],
    )


def pg_writer(url: str, spill: Path, **kwargs):
    """The alternative design: the writer's batches into plain PostgreSQL tables."""
    import duckdb

    from mitmroute.spend import schema
    from mitmroute.spend.lake import SharedLedger
    from mitmroute.spend.writer import SpendLog

    class PgSpendLog(SpendLog):
        con = None

        def _connect(self):
            if self.con is None:
                con = SharedLedger.prepare()
                con.execute(f"ATTACH '{url}' AS spend (TYPE postgres)")
                con.execute("USE spend")
                self._ensure_schema(con)
                self.con = con
            return self.con

        def _ensure_schema(self, con):
            con.execute(schema._create("spend_log", schema.SPEND_LOG))
            con.execute(schema._create("spend_attempts", schema.SPEND_ATTEMPTS))
            con.execute(
                "CREATE TABLE IF NOT EXISTS spend_spill_replays "
                "(spill_id VARCHAR, replayed_at TIMESTAMPTZ, rows_replayed BIGINT)"
            )
            for sql in (
                "CREATE UNIQUE INDEX IF NOT EXISTS spend_log_id ON spend_log (request_id)",
                "CREATE INDEX IF NOT EXISTS spend_log_started ON spend_log (started_at)",
            ):
                con.execute(f"CALL postgres_execute('spend', '{sql}')")

        def _checkpoint(self, con):
            pass

        def _release(self, con, ok):
            if not ok:
                with contextlib.suppress(duckdb.Error):
                    con.close()
                self.con = None

    return PgSpendLog(spill, **kwargs)


def writer_main(n: int, args: dict, out: mp.Queue) -> None:
    if args["design"] == "postgres":
        w = pg_writer(
            args["url"], Path(args["dir"]) / f"host-{n}" / "spend.duckdb", batch_size=args["batch"]
        )
    elif args["local"]:
        from mitmroute.spend import SpendLog

        w = SpendLog(Path(args["dir"]) / f"spend-{n}.duckdb", batch_size=args["batch"])
    else:
        from mitmroute.spend.lake import LakeSpendLog, SharedLedger

        ledger = SharedLedger.parse(args["url"], str(Path(args["dir"]) / "data"))
        w = LakeSpendLog(
            ledger,
            Path(args["dir"]) / f"host-{n}" / "spend.duckdb",
            batch_size=args["batch"],
            inline_rows=args["inline_rows"],
            maintenance_interval=args["maintenance"],
        )
    w.start()
    w.flush(60)  # connected (extensions loaded, ledger attached): not part of the figure
    i = 0
    t0 = time.perf_counter()
    end = t0 + args["seconds"]
    while time.perf_counter() < end:
        if w._held < args["backlog"]:
            for _ in range(100):
                w.record(exchange(n, i))
                i += 1
        else:
            time.sleep(0.002)
    ok = w.close(120)
    elapsed = time.perf_counter() - t0
    out.put(
        {
            "writer": n,
            "recorded": i,
            "elapsed": elapsed,
            "ok": ok,
            **w.summary(),
            "duplicates": w.stats["duplicates"],
            "maintenance": w.stats.get("maintenance", 0),
        }
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--writers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=5000, help="rows per transaction (batch_size)")
    p.add_argument("--inline-rows", type=int, default=100)
    p.add_argument(
        "--maintenance",
        type=float,
        default=300.0,
        help="seconds between moves of inlined rows to Parquet",
    )
    p.add_argument("--backlog", type=int, default=20_000)
    p.add_argument("--local", action="store_true", help="the local DuckDB file instead")
    p.add_argument("--design", choices=("ducklake", "postgres"), default="ducklake")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--keep", action="store_true", help="keep the database and data files")
    p.add_argument("--json", action="store_true")
    return p


def main() -> int:
    args = parser().parse_args()
    report = measure(args)
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0 if report["lost"] == 0 and report["doubled"] == 0 else 1


def measure(args: argparse.Namespace) -> dict:
    """One run (`args` as `parser()` makes them): the report's figures."""
    tmp = Path(tempfile.mkdtemp(prefix="mitmroute-bench-ledger-"))
    dbname = f"mitmroute_bench_{uuid.uuid4().hex[:8]}"
    if not args.local:
        subprocess.run(
            ["psql", f"{args.pg}/postgres", "-qc", f"CREATE DATABASE {dbname}"], check=True
        )
    conf = {
        "local": args.local,
        "dir": str(tmp),
        "url": f"{args.pg}/{dbname}",
        "batch": args.batch,
        "inline_rows": args.inline_rows,
        "maintenance": args.maintenance,
        "seconds": args.seconds,
        "backlog": args.backlog,
        "design": args.design,
    }
    try:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=writer_main, args=(n, conf, out)) for n in range(args.writers)]
        for pr in procs:
            pr.start()
        results = [out.get(timeout=args.seconds + 300) for _ in procs]
        for pr in procs:
            pr.join()
        recorded = sum(r["recorded"] for r in results)
        if args.local:
            import duckdb

            stored = distinct = 0
            for n in range(args.writers):
                con = duckdb.connect(str(tmp / f"spend-{n}.duckdb"), read_only=True)
                a, b = con.execute(
                    "SELECT count(*), count(DISTINCT request_id) FROM spend_log"
                ).fetchone()
                stored, distinct = stored + a, distinct + b
                con.close()
        else:
            from mitmroute.spend import schema
            from mitmroute.spend.lake import SharedLedger, connect_readonly

            ledger = SharedLedger.parse(conf["url"], str(tmp / "data"))
            if args.design == "postgres":
                con = SharedLedger.prepare(threads=2)
                con.execute(f"ATTACH '{conf['url']}' AS spend (TYPE postgres, READ_ONLY)")
                con.execute("USE spend")
                files = None
            else:
                con = connect_readonly(ledger)
                files = con.execute(
                    "SELECT count(*) FROM ducklake_list_files('spend', 'spend_log')"
                ).fetchone()[0]
            stored, distinct = con.execute(
                "SELECT count(*), count(DISTINCT request_id) FROM spend_log"
            ).fetchone()
            daily = schema.VIEWS["spend_daily"]
            t = time.perf_counter()
            for _ in range(3):
                con.execute(f"SELECT count(*) FROM ({daily})").fetchall()
            read_ms = (time.perf_counter() - t) / 3 * 1000
            con.close()
        elapsed = max(r["elapsed"] for r in results)
        report = {
            "mode": "local" if args.local else "shared",
            "writers": args.writers,
            "batch": args.batch,
            "inline_rows": args.inline_rows,
            "seconds": round(elapsed, 1),
            "recorded": recorded,
            "stored": stored,
            "distinct": distinct,
            "rows_per_s": round(stored / elapsed),
            "lost": recorded - distinct,
            "doubled": stored - distinct,
        }
        if not args.local:
            report |= {"design": args.design, "spend_daily_ms": round(read_ms)}
            if files is not None:
                report["parquet_files"] = files
        return report
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            if not args.local:
                subprocess.run(
                    [
                        "psql",
                        f"{args.pg}/postgres",
                        "-qc",
                        f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)",
                    ],
                    check=False,
                )


if __name__ == "__main__":
    sys.exit(main())
