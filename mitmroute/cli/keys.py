"""`mitmroute keys`: manage virtual keys without a running proxy (the store and rules of the
/key/* API). Every command prints JSON.

    mitmroute keys [--config C] generate [--alias A] [--team T]
        [--models gpt-4o,gpt-4o-mini] [--max-budget 50] [--budget-duration 30d]
        [--rpm 60] [--tpm 100000] [--duration 90d] [--metadata '{"env": "prod"}']
    mitmroute keys info KEY            (a key, or its sha256 token)
    mitmroute keys update KEY [the options of generate]
    mitmroute keys delete KEY [KEY ...]
    mitmroute keys list [--alias A] [--team T]

Keys live in the keys file beside the spend log (<spend_db>.keys.sqlite, SQLite) and, when the
config names a Redis, in its shared cache too. A running proxy holds that file: while it runs,
use its /key/* API (see the README). With general_settings.database_url the keys are in that
PostgreSQL database (schema mitmroute), which any number of proxies and this command share:
it works while proxies run, and they see its changes at once (through Redis) or within ~2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from mitmroute.cli import configs
from mitmroute.cli.errors import CliError


def fields(args: argparse.Namespace) -> dict[str, Any]:
    """The key fields the options set (only those given)."""
    pairs = [
        ("key_alias", args.alias),
        ("team_id", args.team),
        ("user_id", args.user),
        ("max_budget", args.max_budget),
        ("budget_duration", args.budget_duration),
        ("rpm_limit", args.rpm),
        ("tpm_limit", args.tpm),
        ("duration", args.duration),
    ]
    out: dict[str, Any] = {name: value for name, value in pairs if value is not None}
    if args.models is not None:
        out["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.metadata is not None:
        try:
            out["metadata"] = json.loads(args.metadata)
        except ValueError as e:
            raise CliError(f"--metadata: not JSON: {e}", 2) from None
    return out


def key_api_call(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, body) of the key API call a command stands for."""
    if args.action == "generate":
        return "POST", "/key/generate", fields(args)
    if args.action == "update":
        return "POST", "/key/update", {"key": args.key, **fields(args)}
    if args.action == "delete":
        return "POST", "/key/delete", {"keys": args.keys}
    if args.action == "info":
        return "GET", "/key/info?" + urlencode({"key": args.key}), None
    query = {"return_full_object": "true", "size": "100"}
    query.update({k: v for k, v in (("key_alias", args.alias), ("team_id", args.team)) if v})
    return "GET", "/key/list?" + urlencode(query), None


async def call(config: Any, method: str, path: str, body: dict[str, Any] | None) -> Any:
    from mitmroute.auth import open_backend
    from mitmroute.auth.key_api import Caller, KeyAdmin, handle

    backend = open_backend(config)
    try:
        admin = KeyAdmin(backend.store, backend.limiter, config.general)
        raw = json.dumps(body).encode() if body is not None else b""
        return await handle(admin, method, path, raw, Caller(is_master=True))
    finally:
        await backend.close()


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alias", help="key_alias (unique)")
    parser.add_argument("--team", help="team_id")
    parser.add_argument("--user", help="user_id")
    parser.add_argument("--models", help="allowed model groups, comma-separated")
    parser.add_argument("--max-budget", type=float, help="USD per budget window")
    parser.add_argument("--budget-duration", help="budget window: 30s, 30m, 24h, 30d")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--duration", help="expire the key after this long: 24h, 90d")
    parser.add_argument("--metadata", help='JSON object, e.g. \'{"team": "team-a"}\'')


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "keys",
        help="virtual keys (generate, info, update, delete, list) without a running proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p)
    p.set_defaults(run=run)


def add_options(p: argparse.ArgumentParser) -> None:
    configs.add_option(p)
    # --config is also accepted after the action (`keys list --config C`).
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _key_options(actions.add_parser("generate", help="make a key (printed once)", parents=[after]))
    actions.add_parser("info", help="show a key", parents=[after]).add_argument("key")
    update = actions.add_parser("update", help="change a key's fields", parents=[after])
    update.add_argument("key")
    _key_options(update)
    actions.add_parser("delete", help="delete keys", parents=[after]).add_argument(
        "keys", nargs="+"
    )
    listing = actions.add_parser("list", help="list keys (first 100)", parents=[after])
    listing.add_argument("--alias")
    listing.add_argument("--team")


def run(args: argparse.Namespace) -> int:
    import sqlite3

    from mitmroute.auth import KeyStoreUnavailable, RedisDown
    from mitmroute.auth.keys import KeysFileBusy

    method, path, body = key_api_call(args)
    _, config = configs.load(args.config, "keys")
    try:
        status, answer = asyncio.run(call(config, method, path, body))
    except KeysFileBusy:
        raise CliError(
            "the keys file is held by a running proxy: use its /key/* API while it runs"
        ) from None
    except sqlite3.Error as e:
        raise CliError(f"keys file: {' '.join(str(e).split())}") from None
    except (RuntimeError, ValueError, KeyStoreUnavailable) as e:
        raise CliError(str(e), 2) from None
    except RedisDown as e:
        raise CliError(f"the key store's Redis does not answer: {e}", 2) from None
    print(json.dumps(answer, indent=2))
    return 0 if status == 200 else 1
