#!/usr/bin/env python3
"""Summarise the spend log: requests, tokens, cost and cache savings, grouped as you like.

    python scripts/spend.py [--db spend.duckdb] [--since 24h] [--by team,model]
                            [--export out.parquet] [--export-rows rows.parquet]

Opens the database read-only, so it works while the proxy runs (the proxy holds the file only
for the few ms of each flush; a busy file is retried for --wait seconds). Holding it open
longer makes the proxy spill rows to <db>.spill.jsonl until you are done; they are replayed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb

from mitmroute.config import ConfigError, parse_duration

GROUPS = {
    "team": "team",
    "key": "api_key_hash",
    "key_alias": "key_alias",
    "model": "coalesce(model_group, requested_model)",
    "model_group": "model_group",
    "deployment": "deployment",
    "provider": "provider",
    "day": "CAST(timezone('UTC', started_at) AS DATE)",
    "status": "status_code",
}
MEASURES = [
    ("requests", "count(*)"),
    ("errors", "count(*) FILTER (WHERE status_code >= 400)"),
    ("cache_hits", "count(*) FILTER (WHERE cache_hit)"),
    ("prompt_tokens", "coalesce(sum(prompt_tokens), 0)::BIGINT"),
    ("completion_tokens", "coalesce(sum(completion_tokens), 0)::BIGINT"),
    ("total_tokens", "coalesce(sum(total_tokens), 0)::BIGINT"),
    ("cost_usd", "coalesce(sum(cost_usd), 0)"),
    ("saved_usd", "coalesce(sum(saved_usd), 0)"),
]


def default_db() -> str:
    """$MITMROUTE_SPEND_DB, else general_settings.spend_db of ./config.yaml, else spend.duckdb."""
    if os.environ.get("MITMROUTE_SPEND_DB"):
        return os.environ["MITMROUTE_SPEND_DB"]
    cfg = Path("config.yaml")
    if cfg.is_file():
        import yaml

        try:
            doc = yaml.safe_load(cfg.read_text()) or {}
            db = (doc.get("general_settings") or {}).get("spend_db")
            if isinstance(db, str) and db:
                return db
        except (yaml.YAMLError, AttributeError, OSError):
            pass
    return "spend.duckdb"


def connect_readonly(db: str, wait: float) -> duckdb.DuckDBPyConnection:
    """Open `db` read-only, retrying while the proxy holds it for a flush."""
    if not Path(db).is_file():
        raise SystemExit(f"spend.py: no spend database at {db}")
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(db, read_only=True)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() >= deadline:
                raise SystemExit(f"spend.py: cannot open {db}: {e}") from None
            time.sleep(0.05)


def summary_sql(by: list[str], since_seconds: float | None) -> str:
    cols = [f"{GROUPS[g]} AS {g}" for g in by]
    cols += [f"{expr} AS {name}" for name, expr in MEASURES]
    where = ""
    if since_seconds is not None:
        where = f"WHERE started_at >= now() - to_seconds({float(since_seconds)!r})"
    group = " GROUP BY ALL" if by else ""
    order = "cost_usd DESC, requests DESC" + "".join(f", {g} NULLS LAST" for g in by)
    return f"SELECT {', '.join(cols)} FROM spend_log {where}{group} ORDER BY {order}"


def rows_sql(since_seconds: float | None) -> str:
    where = ""
    if since_seconds is not None:
        where = f" WHERE started_at >= now() - to_seconds({float(since_seconds)!r})"
    return f"SELECT * FROM spend_log{where} ORDER BY started_at"


def fmt(value: Any, name: str) -> str:
    if value is None:
        return "-"
    if name.endswith("_usd"):
        return f"{Decimal(value):,.6f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if name != "status" else str(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def render(headers: list[str], rows: list[tuple[Any, ...]], n_groups: int) -> str:
    """A plain-text table: group columns left-aligned, numbers right-aligned, a TOTAL line."""
    body = [[fmt(v, h) for v, h in zip(r, headers, strict=True)] for r in rows]
    total_line: list[str] | None = None
    if n_groups and len(rows) > 1:
        total_line = ["TOTAL"] + [""] * (n_groups - 1)
        for i in range(n_groups, len(headers)):
            total_line.append(fmt(sum(r[i] or 0 for r in rows), headers[i]))
    table = [headers, *body] + ([total_line] if total_line else [])
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if i < n_groups else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    text = [line(headers), rule, *(line(r) for r in body)]
    if total_line:
        text += [rule, line(total_line)]
    return "\n".join(text)


def copy_to(con: duckdb.DuckDBPyConnection, sql: str, path: str) -> None:
    quoted = path.replace("'", "''")
    con.execute(f"COPY ({sql}) TO '{quoted}' (FORMAT parquet)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=None, help="spend database (default: see default_db)")
    p.add_argument("--since", default="24h", help="window like 30m, 24h, 7d, or 'all'")
    p.add_argument("--by", default="model", help=f"comma list of: {', '.join(GROUPS)} (or none)")
    p.add_argument("--export", metavar="PATH", help="write the summary table as Parquet")
    p.add_argument("--export-rows", metavar="PATH", help="write the window's raw rows as Parquet")
    p.add_argument("--wait", type=float, default=5.0, help="seconds to retry a busy file")
    p.add_argument("--sql", metavar="QUERY", help="run any SQL read-only and print the result")
    args = p.parse_args(argv)
    if args.sql:
        con = connect_readonly(args.db or default_db(), args.wait)
        try:
            cur = con.execute(args.sql)
            rows = cur.fetchall()
            print(render([d[0] for d in cur.description], rows, 0) if rows else "no rows")
        finally:
            con.close()
        return 0

    by = [] if args.by in ("", "none") else [g.strip() for g in args.by.split(",") if g.strip()]
    bad = [g for g in by if g not in GROUPS]
    if bad:
        p.error(f"--by: unknown column(s) {', '.join(bad)} (allowed: {', '.join(GROUPS)})")
    if len(set(by)) != len(by):
        p.error("--by: a column is named twice")
    since: float | None = None
    if args.since.lower() != "all":
        try:
            since = parse_duration(args.since, "--since")
        except ConfigError as e:
            p.error(str(e))

    db = args.db or default_db()
    con = connect_readonly(db, args.wait)
    try:
        sql = summary_sql(by, since)
        cur = con.execute(sql)
        headers = [d[0] for d in cur.description]
        rows = cur.fetchall()
        window = "all time" if since is None else f"the last {args.since}"
        print(f"{db}: {window}, by {', '.join(by) or 'nothing'}")
        if not rows or rows[0][len(by)] == 0:
            print("no requests")
        else:
            print(render(headers, rows, len(by)))
        if args.export:
            copy_to(con, sql, args.export)
            print(f"wrote {args.export}")
        if args.export_rows:
            copy_to(con, rows_sql(since), args.export_rows)
            print(f"wrote {args.export_rows}")
    finally:
        con.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
