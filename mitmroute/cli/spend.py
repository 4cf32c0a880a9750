"""`mitmroute spend`: the spend log as a table (requests, tokens, cost, cache savings) grouped as
you like, any read-only SQL, or a Parquet export; and its retention.

    mitmroute spend [--config C] [--since 24h] [--by team,model]
                    [--export out.parquet] [--export-rows rows.parquet] [--sql QUERY]
    mitmroute spend [--config C] --expire 180d      delete rows started before then, compact
    mitmroute spend [--config C] --compact          compact only

The ledger is the one the config names: the shared one when general_settings.database_url is
set (a DuckLake on that PostgreSQL database, as every proxy of that config writes it), else the
DuckDB file general_settings.spend_db (or --db). The file is opened read-only, so this works
while the proxy runs (the proxy holds the file only for the few ms of each flush; a busy file
is retried for --wait seconds). Holding it open longer makes the proxy spill rows to
<db>.spill.jsonl until you are done; they are replayed. The shared ledger has no such limit.

--compact (safe while proxies write): in the shared ledger, inlined rows go to Parquet, small
files are merged, snapshots older than a day are expired and the files nothing needs deleted;
in a file, a CHECKPOINT (freed blocks are reused; the file does not shrink).
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

from mitmroute.cli import configs
from mitmroute.cli.errors import CliError
from mitmroute.cli.table import render
from mitmroute.config import ConfigError, load_config, parse_duration
from mitmroute.money import whatif
from mitmroute.spend import lake

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


def duckdb_error(e: Exception) -> str:
    """DuckDB's message without its multi-line caret diagram."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def connect_readonly(db: str, wait: float, read_only: bool = True) -> Any:
    """Open `db` read-only, retrying while the proxy holds it for a flush."""
    import duckdb

    if not Path(db).is_file():
        raise CliError(f"no spend database at {db} (it appears after the proxy's first request)")
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(db, read_only=read_only)
        except duckdb.Error as e:
            if "lock" not in str(e).lower() or time.monotonic() >= deadline:
                raise CliError(f"cannot open {db}: {duckdb_error(e)}") from None
            time.sleep(0.05)


def connect_shared(ledger: lake.SharedLedger, read_only: bool = True) -> Any:
    """The shared ledger, attached as the default catalog (`spend`)."""
    import duckdb

    from mitmroute.spend import extensions

    try:
        con = lake.connect_readonly(ledger)  # LedgerConfigError if there is none yet
        if read_only:
            return con
        con.close()  # to write (retention): never create one
        return ledger.connect(threads=2)
    except (lake.LedgerConfigError, extensions.ExtensionError) as e:
        raise CliError(str(e)) from None
    except duckdb.Error as e:
        raise CliError(f"cannot open the shared ledger {ledger.label}: {duckdb_error(e)}") from None


def open_ledger(args: argparse.Namespace, read_only: bool = True) -> tuple[Any, str, bool]:
    """The ledger the config names (or --db): (connection, its name, shared?)."""
    if args.db:
        return connect_readonly(args.db, args.wait, read_only), args.db, False
    _, config = configs.load(args.config, "spend")
    try:
        shared = lake.from_settings(config.general)
    except lake.LedgerConfigError as e:
        raise CliError(str(e), 2) from None
    if shared is not None:
        return connect_shared(shared, read_only), shared.label, True
    db = config.general.spend_db
    return connect_readonly(db, args.wait, read_only), db, False


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


def summary_table(headers: list[str], rows: list[tuple[Any, ...]], n_groups: int) -> str:
    """Group columns left-aligned, numbers right-aligned, a TOTAL line under several rows."""
    body = [[fmt(v, h) for v, h in zip(r, headers, strict=True)] for r in rows]
    total: list[str] | None = None
    if n_groups and len(rows) > 1:
        total = ["TOTAL"] + [""] * (n_groups - 1)
        total += [
            fmt(sum(r[i] or 0 for r in rows), headers[i]) for i in range(n_groups, len(headers))
        ]
    return render(headers, body, left=n_groups, footer=total)


def query(con: Any, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run `sql`; a DuckDB error (a typo, a missing table) is one CliError line."""
    import duckdb

    try:
        cur = con.execute(sql)
        return [d[0] for d in cur.description or ()], cur.fetchall()
    except duckdb.Error as e:
        raise CliError(f"SQL error: {duckdb_error(e)}") from None


def copy_to(con: Any, sql: str, path: str) -> None:
    import duckdb

    quoted = path.replace("'", "''")
    try:
        con.execute(f"COPY ({sql}) TO '{quoted}' (FORMAT parquet)")
    except duckdb.Error as e:
        raise CliError(f"cannot write {path}: {duckdb_error(e)}") from None


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "spend",
        help="the spend log: a table by team/model/..., any read-only SQL, Parquet export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p)
    p.set_defaults(run=run)


def add_options(p: argparse.ArgumentParser) -> None:
    configs.add_option(p)
    p.add_argument("--db", help="the spend database (default: general_settings.spend_db)")
    p.add_argument("--since", default="24h", help="window like 30m, 24h, 7d, or 'all'")
    p.add_argument("--by", default="model", help=f"comma list of: {', '.join(GROUPS)} (or none)")
    p.add_argument("--export", metavar="PATH", help="write the summary table as Parquet")
    p.add_argument("--export-rows", metavar="PATH", help="write the window's raw rows as Parquet")
    p.add_argument("--wait", type=float, default=5.0, help="seconds to retry a busy file")
    p.add_argument("--sql", metavar="QUERY", help="run any SQL read-only and print the result")
    p.add_argument(
        "--what-if",
        metavar="CONFIG",
        help="re-price the window's requests under another config.yaml (its groups, tiers and "
        "prices), from the ledger's token counts, calling no backend; --by model_group,team,day",
    )
    p.add_argument(
        "--expire",
        metavar="AGE",
        help="delete the rows started more than AGE ago (like 180d), then --compact",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="compact the ledger (shared: merge files, expire old snapshots; file: checkpoint)",
    )


def what_if(con: Any, path: str, by: list[str], since: float | None, db: str, label: str) -> int:
    """The window's cost as it was, and under the config at `path`."""
    by = ["model_group" if g == "model" else g for g in by]
    try:
        whatif.by_dimensions(by)
        other = load_config(path)
    except (ValueError, ConfigError) as e:
        raise CliError(f"--what-if: {e}", 2) from None
    window = ""
    if since is not None:
        window = f"AND started_at >= now() - to_seconds({float(since)!r})"
    report = whatif.reprice(con, other, by, window)
    window_text = "all time" if since is None else f"the last {label}"
    print(f"{db}: {window_text}, priced as it ran and as {path} would have priced it")
    headers = [*by, "requests", "cost_usd", "what_if_usd", "difference_usd", "unpriced"]
    rows = []
    for key, line in sorted(report.lines.items(), key=lambda kv: -kv[1].cost_now):
        rows.append([*(fmt(k, "") for k in key[: len(by)]), *_line(line)])
    if report.lines:
        rows.append([*(["total"] + [""] * (len(by) - 1) if by else []), *_line(report.total)])
    print(render(headers, rows) if report.lines else "nothing to re-price: no answered requests")
    return 0


def _line(line: whatif.Line) -> list[str]:
    return [
        str(line.rows),
        fmt(line.cost_now, "cost_usd"),
        fmt(line.cost_then, "cost_usd"),
        fmt(line.difference, "cost_usd"),
        str(line.unplaced),
    ]


def run(args: argparse.Namespace) -> int:
    by = [] if args.by in ("", "none") else [g.strip() for g in args.by.split(",") if g.strip()]
    if args.what_if:
        by = ["model_group" if g == "model" else g for g in by]
    bad = [g for g in by if g not in GROUPS]
    if bad:
        raise CliError(
            f"--by: unknown column(s) {', '.join(bad)} (allowed: {', '.join(GROUPS)})", 2
        )
    if len(set(by)) != len(by):
        raise CliError("--by: a column is named twice", 2)
    since: float | None = None
    if args.since.lower() != "all":
        try:
            since = parse_duration(args.since, "--since")
        except ConfigError as e:
            raise CliError(str(e), 2) from None

    if args.expire or args.compact:
        return retention(args)
    con, db, _ = open_ledger(args)
    try:
        if args.sql:
            headers, rows = query(con, args.sql)
            print(
                render(
                    headers, [[fmt(v, h) for v, h in zip(r, headers, strict=True)] for r in rows]
                )
                if rows
                else "no rows"
            )
            return 0
        if args.what_if:
            return what_if(con, args.what_if, by, since, db, args.since)
        sql = summary_sql(by, since)
        headers, rows = query(con, sql)
        window = "all time" if since is None else f"the last {args.since}"
        print(f"{db}: {window}, by {', '.join(by) or 'nothing'}")
        if not rows or rows[0][len(by)] == 0:
            print("no requests")
        else:
            print(summary_table(headers, rows, len(by)))
        if args.export:
            copy_to(con, sql, args.export)
            print(f"wrote {args.export}")
        if args.export_rows:
            copy_to(con, rows_sql(since), args.export_rows)
            print(f"wrote {args.export_rows}")
    finally:
        con.close()
    return 0


def retention(args: argparse.Namespace) -> int:
    """--expire AGE and --compact: delete old rows, then compact (safe while proxies write)."""
    import duckdb

    age: float | None = None
    if args.expire:
        try:
            age = parse_duration(args.expire, "--expire")
        except ConfigError as e:
            raise CliError(str(e), 2) from None
    con, db, shared = open_ledger(args, read_only=False)
    try:
        if age is not None:
            cutoff = f"now() - to_seconds({float(age)!r})"
            con.execute("BEGIN")
            rows = con.execute(f"DELETE FROM spend_log WHERE started_at < {cutoff}").fetchall()
            con.execute(f"DELETE FROM spend_attempts WHERE started_at < {cutoff}")
            con.execute("COMMIT")
            print(
                f"{db}: deleted {rows[0][0] if rows else 0} rows started before {args.expire} ago"
            )
        if shared:
            done = lake.compact(con)
            print(f"{db}: compacted ({', '.join(f'{k}: {v}' for k, v in done.items())})")
        else:
            con.execute("CHECKPOINT")
            print(f"{db}: checkpointed (freed blocks are reused; the file does not shrink)")
    except duckdb.Error as e:
        raise CliError(f"{db}: {duckdb_error(e)}") from None
    finally:
        con.close()
    return 0
