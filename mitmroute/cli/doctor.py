"""`mitmroute doctor`: check a set-up before traffic fails.

    mitmroute doctor [--config C] [--proxy URL | --no-proxy] [--confdir DIR] [--timeout S]

Checks the config, mitmproxy's CA, the listening proxy (a request through it to the first
intercepted host's /v1/models, verified with the CA: mitmroute must answer it), Redis when the
config names one, the ledger (spend_db writable, readable), and each deployment with its own
key (see `mitmroute.cli.probe`): reachable, key accepted, model present, latency. Prints two
tables and exits 1 when anything is broken, naming it; warnings don't fail.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mitmroute.cli import configs
from mitmroute.cli.ca import add_confdir_option, ca_cert
from mitmroute.cli.env import DEFAULT_PROXY, proxy_url
from mitmroute.cli.errors import CliError
from mitmroute.cli.probe import FAIL, OK, WARN, Probe, Prober
from mitmroute.cli.spend import connect_readonly, duckdb_error
from mitmroute.cli.table import render
from mitmroute.config import ConfigError, RouterConfig, load_config
from mitmroute.spend import lake

SKIPPED = "-"


@dataclass(slots=True)
class Check:
    name: str
    status: str
    detail: str


def check_config(explicit: str | None) -> tuple[Check, RouterConfig | None]:
    choice = configs.find_config(explicit)
    try:
        config = load_config(choice.path)
    except ConfigError as e:
        return Check("config", FAIL, f"{choice.describe()}: {e}"), None
    groups = len({d.model_name for d in config.deployments})
    detail = f"{choice.describe()}: {len(config.deployments)} deployments in {groups} groups"
    return Check("config", OK, detail), config


def check_ca(confdir: Path) -> Check:
    from cryptography import x509

    path = ca_cert(confdir)
    if not path.is_file():
        return Check("ca", FAIL, f"{path} missing: start the proxy once, or run `mitmroute ca`")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        return Check("ca", FAIL, f"{path}: not a PEM certificate ({e})")
    expires = cert.not_valid_after_utc
    if expires <= datetime.now(UTC):
        return Check("ca", FAIL, f"{path} expired on {expires:%Y-%m-%d}")
    return Check("ca", OK, f"{path}, valid until {expires:%Y-%m-%d}")


async def check_proxy(url: str | None, confdir: Path, host: str) -> Check:
    """A request through the proxy to `host`'s /v1/models, trusting only mitmproxy's CA."""
    import aiohttp

    if url is None:
        return Check("proxy", SKIPPED, "not checked (--no-proxy)")
    ca = ca_cert(confdir)
    context = ssl.create_default_context(cafile=str(ca)) if ca.is_file() else True
    target = f"https://{host}/v1/models"
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=10)) as s,
            s.get(target, proxy=url, ssl=context, headers={"x-mitmroute-tags": "doctor"}) as r,
        ):
            await r.read()
            status, headers = r.status, r.headers
    except aiohttp.ClientProxyConnectionError:
        return Check("proxy", FAIL, f"nothing listening at {url} (start it: mitmroute run)")
    except aiohttp.ClientConnectorCertificateError:
        why = f"its certificate for {host} is not signed by {ca}: does it use another confdir?"
        return Check("proxy", FAIL, f"{url}: {why}")
    except TimeoutError:
        return Check("proxy", FAIL, f"{url}: no answer to GET {target} in 10 s")
    except aiohttp.ClientError as e:
        return Check("proxy", FAIL, f"{url}: GET {target} failed: {e}")
    ms = (time.monotonic() - started) * 1000
    if "x-mitmroute-request-id" not in headers:
        why = f"answered GET {target} {status} without mitmroute's headers"
        return Check("proxy", FAIL, f"{url} {why}: not mitmroute, or {host} not intercepted")
    return Check("proxy", OK, f"{url}: mitmroute answered GET {target} ({status}) in {ms:.0f} ms")


async def check_redis(config: RouterConfig) -> Check:
    from mitmroute.auth import redis_target
    from mitmroute.redis_client import connect

    target = redis_target(config)
    if target is None:
        return Check("redis", SKIPPED, "not configured: cache and limits are in-process")
    client = connect(url=target.url, host=target.host, port=target.port, password=target.password)
    started = time.monotonic()
    try:
        await asyncio.wait_for(client.ping(), 3)
    except Exception as e:  # any failure is the finding
        return Check("redis", FAIL, f"{target.label}: {str(e) or type(e).__name__}")
    finally:
        await client.aclose()
    return Check(
        "redis", OK, f"{target.label}: PONG in {(time.monotonic() - started) * 1000:.0f} ms"
    )


def check_shared_ledger(config: RouterConfig) -> Check:
    """database_url: the shared ledger readable, its rows, spill files waiting on this host."""
    from mitmroute.cli.spend import connect_shared

    try:
        ledger = lake.from_settings(config.general)
        assert ledger is not None
        con = connect_shared(ledger)
    except (lake.LedgerConfigError, CliError) as e:
        if "yet" in str(e):  # no ledger yet: the first proxy creates it
            return Check("ledger", OK, str(e))
        return Check("ledger", FAIL, str(e))
    try:
        rows, last = con.execute("SELECT count(*), max(started_at) FROM spend_log").fetchone()
    except Exception as e:  # duckdb.Error
        return Check("ledger", FAIL, f"{ledger.label}: unreadable: {duckdb_error(e)}")
    finally:
        con.close()
    db = config.general.spend_db
    spills = sorted(Path(db).parent.glob(f"{Path(db).name}.spill*.jsonl"))
    waiting = f"; {len(spills)} spill file(s) on this host wait: {spills[0]}" if spills else ""
    when = f", last {last:%Y-%m-%d %H:%M:%S %Z}" if last else ""
    status = WARN if waiting else OK
    return Check("ledger", status, f"{ledger.label} (shared): {rows} rows{when}{waiting}")


def check_ledger(config: RouterConfig) -> Check:
    from mitmroute.spend.writer import SpendDbError, check_writable

    if config.general.database_url:
        return check_shared_ledger(config)
    db = config.general.spend_db
    if db == ":memory:":
        return Check("ledger", SKIPPED, "spend_db is :memory: (nothing kept)")
    try:
        check_writable(db)
    except SpendDbError as e:
        return Check("ledger", FAIL, str(e))
    spills = sorted(Path(db).parent.glob(f"{Path(db).name}.spill*.jsonl"))
    waiting = f"; {len(spills)} spill file(s) wait to be replayed: {spills[0]}" if spills else ""
    if not Path(db).is_file():
        return Check("ledger", OK, f"{db}: writable; created by the first request{waiting}")
    try:
        con = connect_readonly(db, wait=5)
    except CliError as e:
        return Check("ledger", FAIL, f"{db}: writable but {e}")
    try:
        rows, last = con.execute("SELECT count(*), max(started_at) FROM spend_log").fetchone()
    except Exception as e:  # duckdb.Error: no spend_log table, a corrupt file
        return Check("ledger", FAIL, f"{db}: unreadable: {duckdb_error(e)}")
    finally:
        con.close()
    when = f", last {last:%Y-%m-%d %H:%M:%S %Z}" if last else ""
    status = WARN if waiting else OK
    return Check("ledger", status, f"{db}: writable, readable: {rows} rows{when}{waiting}")


async def diagnose(args: argparse.Namespace) -> tuple[list[Check], list[Probe]]:
    config_check, config = check_config(args.config)
    checks = [config_check, check_ca(args.confdir)]
    host = config.general.intercept_hosts[0] if config else "api.openai.com"
    proxy = None if args.no_proxy else proxy_url(args.proxy)
    if config is None:
        checks.append(await check_proxy(proxy, args.confdir, host))
        return checks, []
    prober = Prober(config.deployments, args.timeout)
    proxy_check, redis_check, probes = await asyncio.gather(
        check_proxy(proxy, args.confdir, host),
        check_redis(config),
        prober.probe_all(config.deployments),
    )
    checks += [proxy_check, redis_check, check_ledger(config)]
    return checks, probes


def report(checks: list[Check], probes: list[Probe]) -> list[str]:
    """Print the tables; return what is broken, one phrase each."""
    print(render(["check", "status", "detail"], [[c.name, c.status, c.detail] for c in checks]))
    if probes:
        print()
        headers = ["group", "deployment", "reachable", "key", "model", "latency", "status"]
        print(render(headers, [p.row() for p in probes]))
    elif checks[0].status == OK:
        print("\nno deployments: every request passes through to its original host")
    broken = [c.name for c in checks if c.status == FAIL]
    for p in probes:
        if p.status == FAIL:
            broken.append(f"{p.deployment.model_name} ({p.label}: {p.detail})")
    return broken


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "doctor",
        help="check config, CA, proxy, Redis, ledger and every deployment; exit 1 if broken",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configs.add_option(p)
    p.add_argument(
        "--proxy",
        default=DEFAULT_PROXY,
        metavar="URL",
        help=f"the running proxy to check (default: {DEFAULT_PROXY})",
    )
    p.add_argument("--no-proxy", action="store_true", help="don't check a running proxy")
    add_confdir_option(p)
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per deployment request (default 10)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(
        f"mitmroute doctor: config {configs.find_config(args.config).describe()}", file=sys.stderr
    )
    checks, probes = asyncio.run(diagnose(args))
    broken = report(checks, probes)
    if broken:
        sys.stdout.flush()
        print(f"mitmroute doctor: broken: {'; '.join(broken)}", file=sys.stderr)
        return 1
    warned = sum(1 for x in [*checks, *probes] if x.status == WARN)
    print(f"\nall good{f' ({warned} warnings)' if warned else ''}")
    return 0
