"""Tables and views of the spend database (DuckDB). Everything here is idempotent.

Timestamps are TIMESTAMPTZ holding UTC instants; the views bucket days and hours in UTC
whatever the session's TimeZone. Note: fetching a TIMESTAMPTZ value into Python needs `pytz`
(DuckDB's rule); cast to VARCHAR or use the views' DATE columns to avoid it.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

SPEND_LOG: tuple[tuple[str, str], ...] = (
    ("request_id", "VARCHAR"),
    ("started_at", "TIMESTAMPTZ"),
    ("ended_at", "TIMESTAMPTZ"),
    ("latency_ms", "DOUBLE"),
    ("ttft_ms", "DOUBLE"),
    ("endpoint", "VARCHAR"),
    ("stream", "BOOLEAN"),
    ("api_key_hash", "VARCHAR"),
    ("key_alias", "VARCHAR"),
    ("team", "VARCHAR"),
    ("user", "VARCHAR"),
    ("requested_model", "VARCHAR"),
    ("model_group", "VARCHAR"),
    ("deployment", "VARCHAR"),
    ("provider", "VARCHAR"),
    ("api_base", "VARCHAR"),
    ("status_code", "INTEGER"),
    ("error_type", "VARCHAR"),
    ("cache_hit", "BOOLEAN"),
    ("attempts", "INTEGER"),
    ("fallback_used", "BOOLEAN"),
    ("prompt_tokens", "BIGINT"),
    ("completion_tokens", "BIGINT"),
    ("cached_tokens", "BIGINT"),
    ("cache_creation_tokens", "BIGINT"),
    ("reasoning_tokens", "BIGINT"),
    ("total_tokens", "BIGINT"),
    ("usage_source", "VARCHAR"),
    ("cost_usd", "DECIMAL(18,10)"),
    ("saved_usd", "DECIMAL(18,10)"),
    ("tags", "VARCHAR[]"),
    ("metadata", "JSON"),
    # version 2: the complexity router's choice and what the baseline tier would have cost
    ("route_tier", "VARCHAR"),
    ("route_reason", "VARCHAR"),
    ("route_score", "DOUBLE"),
    ("baseline_cost_usd", "DECIMAL(18,10)"),
)
V1_WIDTH = 32
"""Columns of a version-1 row: files and spill lines of older versions lack the rest, which
`ensure_schema` adds (ALTER TABLE ... ADD COLUMN IF NOT EXISTS) and spill replay fills with
NULL."""

SPEND_ATTEMPTS: tuple[tuple[str, str], ...] = (
    ("request_id", "VARCHAR"),
    ("attempt", "INTEGER"),
    ("deployment", "VARCHAR"),
    ("api_base", "VARCHAR"),
    ("status_code", "INTEGER"),
    ("error_type", "VARCHAR"),
    ("latency_ms", "DOUBLE"),
    ("started_at", "TIMESTAMPTZ"),
)


def _q(name: str) -> str:
    return f'"{name}"'


def _create(table: str, columns: tuple[tuple[str, str], ...]) -> str:
    body = ",\n    ".join(f"{_q(n)} {t}" for n, t in columns)
    return f"CREATE TABLE IF NOT EXISTS {table} (\n    {body}\n)"


def _wire_type(sql_type: str) -> str:
    """How a column travels in the JSON batch (see insert_sql): text for exact types."""
    if sql_type in {"TIMESTAMPTZ", "JSON"} or sql_type.startswith("DECIMAL"):
        return "VARCHAR"
    return sql_type


def insert_sql(table: str, columns: tuple[tuple[str, str], ...]) -> str:
    """One INSERT for a whole batch passed as a single JSON text parameter, column-oriented.

    `{"col": [v1, v2, ...], ...}` is parsed by DuckDB (from_json) and unnested: one Python
    object crosses into DuckDB per batch, which is ~50x faster than executemany.
    Timestamps and decimals travel as text and are cast exactly.
    """
    spec = ",".join(f'"{n}":"{_wire_type(t)}[]"' for n, t in columns)
    names = ", ".join(_q(n) for n, _ in columns)
    cols = ", ".join(f"CAST(UNNEST(j.{_q(n)}) AS {t})" for n, t in columns)
    batch = f"SELECT from_json($1, '{{{spec}}}') AS j"
    return f"INSERT INTO {table} ({names}) SELECT {cols} FROM ({batch})"


DAY = "CAST(timezone('UTC', started_at) AS DATE)"
MODEL = "coalesce(model_group, requested_model)"
OK = "(status_code IS NULL OR status_code < 400)"
PRICED = "cost_usd IS NOT NULL AND baseline_cost_usd IS NOT NULL"


def _sums(*cols: str) -> str:
    """`sum(col)::BIGINT AS col, ...` (BIGINT, not HUGEINT, so Parquet keeps integers)."""
    return ", ".join(f"sum({c})::BIGINT AS {c}" for c in cols)


MONEY = "coalesce(sum(cost_usd), 0) AS cost_usd, coalesce(sum(saved_usd), 0) AS saved_usd"
MONEY_SUMS = "sum(cost_usd) AS cost_usd, sum(saved_usd) AS saved_usd"

VIEWS: dict[str, str] = {
    # spend per day by team, key and model (sum further for coarser questions)
    "spend_daily": f"""
        SELECT {DAY} AS day, team, api_key_hash, key_alias, {MODEL} AS model,
               count(*) AS requests,
               count(*) FILTER (WHERE NOT {OK}) AS errors,
               count(*) FILTER (WHERE cache_hit) AS cache_hits,
               {_sums("prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens")},
               {MONEY}
        FROM spend_log GROUP BY ALL""",
    "spend_daily_team": f"""
        SELECT day, team, {_sums("requests", "total_tokens")}, {MONEY_SUMS}
        FROM spend_daily GROUP BY ALL""",
    "spend_daily_key": f"""
        SELECT day, api_key_hash, key_alias, team, {_sums("requests", "total_tokens")},
               {MONEY_SUMS}
        FROM spend_daily GROUP BY ALL""",
    "spend_daily_model": f"""
        SELECT day, model,
               {_sums("requests", "prompt_tokens", "completion_tokens", "total_tokens")},
               {MONEY_SUMS}
        FROM spend_daily GROUP BY ALL""",
    # the last 60 minutes by model (evaluated at query time)
    "spend_last_hour": f"""
        SELECT {MODEL} AS model, count(*) AS requests,
               count(*) FILTER (WHERE NOT {OK}) AS errors,
               {_sums("prompt_tokens", "completion_tokens", "total_tokens")},
               {MONEY}
        FROM spend_log WHERE started_at >= now() - INTERVAL 1 HOUR
        GROUP BY ALL""",
    # response-cache hits and what they saved; provider prompt-cache tokens alongside
    "cache_savings": f"""
        SELECT {DAY} AS day, {MODEL} AS model, count(*) AS requests,
               count(*) FILTER (WHERE cache_hit) AS cache_hits,
               round(count(*) FILTER (WHERE cache_hit) / count(*), 4) AS hit_rate,
               coalesce(sum(saved_usd), 0) AS saved_usd,
               coalesce(sum(cached_tokens), 0)::BIGINT AS provider_cached_tokens
        FROM spend_log GROUP BY ALL""",
    # how often a model group needed a retry or a fallback
    "fallback_rate": f"""
        SELECT {DAY} AS day, model_group, count(*) AS requests,
               count(*) FILTER (WHERE fallback_used) AS fallbacks,
               round(count(*) FILTER (WHERE fallback_used) / count(*), 4) AS fallback_rate,
               count(*) FILTER (WHERE attempts > 1) AS retried,
               round(count(*) FILTER (WHERE attempts > 1) / count(*), 4) AS retry_rate,
               count(*) FILTER (WHERE NOT {OK}) AS errors,
               round(count(*) FILTER (WHERE NOT {OK}) / count(*), 4) AS error_rate
        FROM spend_log WHERE NOT cache_hit GROUP BY ALL""",
    # latency of successful, non-cached requests per deployment that answered
    "deployment_latency": f"""
        SELECT deployment, api_base, count(*) AS requests,
               quantile_cont(latency_ms, 0.5) AS p50_ms,
               quantile_cont(latency_ms, 0.9) AS p90_ms,
               quantile_cont(latency_ms, 0.99) AS p99_ms,
               quantile_cont(ttft_ms, 0.5) AS ttft_p50_ms,
               quantile_cont(ttft_ms, 0.9) AS ttft_p90_ms,
               quantile_cont(ttft_ms, 0.99) AS ttft_p99_ms
        FROM spend_log WHERE {OK} AND NOT cache_hit AND deployment IS NOT NULL
        GROUP BY ALL""",
    "deployment_latency_daily": f"""
        SELECT {DAY} AS day, deployment, api_base, count(*) AS requests,
               quantile_cont(latency_ms, 0.5) AS p50_ms,
               quantile_cont(latency_ms, 0.9) AS p90_ms,
               quantile_cont(latency_ms, 0.99) AS p99_ms
        FROM spend_log WHERE {OK} AND NOT cache_hit AND deployment IS NOT NULL
        GROUP BY ALL""",
    # what the complexity routers saved: cost against the same tokens on the baseline tier.
    # Sums are over rows with both prices (so saved = baseline - cost); rows with tokens but
    # an unknown price on either side are counted in `unpriced`. Cache hits carry no baseline.
    "routing_savings": f"""
        SELECT {DAY} AS day, team, requested_model AS router, route_tier,
               model_group, count(*) AS requests,
               count(*) FILTER (WHERE NOT cache_hit AND total_tokens IS NOT NULL
                   AND (cost_usd IS NULL OR baseline_cost_usd IS NULL)) AS unpriced,
               coalesce(sum(cost_usd) FILTER (WHERE {PRICED}), 0) AS cost_usd,
               coalesce(sum(baseline_cost_usd) FILTER (WHERE {PRICED}), 0)
                   AS baseline_cost_usd,
               coalesce(sum(baseline_cost_usd - cost_usd), 0) AS saved_by_routing_usd
        FROM spend_log WHERE route_reason IS NOT NULL GROUP BY ALL""",
    # every upstream attempt, failed ones included: outcome mix per deployment
    "attempt_errors": f"""
        SELECT {DAY} AS day, deployment, api_base,
               CASE WHEN error_type IS NULL AND {OK} THEN 'ok'
                    ELSE coalesce(error_type, CAST(status_code AS VARCHAR)) END AS outcome,
               count(*) AS attempts, quantile_cont(latency_ms, 0.5) AS p50_ms
        FROM spend_attempts GROUP BY ALL""",
}

META = """
CREATE TABLE IF NOT EXISTS spend_meta (key VARCHAR PRIMARY KEY, value VARCHAR)
"""
SPILL_REPLAYS = """
CREATE TABLE IF NOT EXISTS spend_spill_replays (
    spill_id VARCHAR PRIMARY KEY, replayed_at TIMESTAMPTZ DEFAULT now(), rows_replayed BIGINT
)
"""


def ddl() -> list[str]:
    """Every statement that creates or refreshes the schema, in order."""
    stmts = [
        _create("spend_log", SPEND_LOG),
        *(
            f"ALTER TABLE spend_log ADD COLUMN IF NOT EXISTS {_q(n)} {t}"
            for n, t in SPEND_LOG[V1_WIDTH:]
        ),
        _create("spend_attempts", SPEND_ATTEMPTS),
        META.strip(),
        SPILL_REPLAYS.strip(),
        f"INSERT OR REPLACE INTO spend_meta VALUES ('schema_version', '{SCHEMA_VERSION}')",
    ]
    stmts += [f"CREATE OR REPLACE VIEW {name} AS {sql.strip()}" for name, sql in VIEWS.items()]
    return stmts


def ensure_schema(con: object) -> None:
    """Create tables and (re)create views on an open read-write DuckDB connection."""
    for stmt in ddl():
        con.execute(stmt)  # type: ignore[attr-defined]
