#!/usr/bin/env python3
"""Manage virtual keys without a running proxy (same store and rules as the /key/* API).

Keys live in the DuckDB keys file beside the spend log (and, when the config names a Redis, in
its shared cache too). A running proxy holds that file: while it runs, use its /key/* API.
Every command prints JSON.

    python scripts/keys.py [--config config.yaml] generate [--alias A] [--team T]
        [--models gpt-4o,gpt-4o-mini] [--max-budget 50] [--budget-duration 30d]
        [--rpm 60] [--tpm 100000] [--duration 90d] [--metadata '{"env": "prod"}']
    python scripts/keys.py info KEY            (a key, or its sha256 token)
    python scripts/keys.py update KEY [the options of generate]
    python scripts/keys.py delete KEY [KEY ...]
    python scripts/keys.py list [--alias A] [--team T]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmroute.auth import open_backend
from mitmroute.auth.key_api import Caller, KeyAdmin, handle
from mitmroute.config import ConfigError, default_config_path, load_config


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The key fields the options set (only those given)."""
    out: dict[str, Any] = {}
    pairs = [("key_alias", args.alias), ("team_id", args.team), ("user_id", args.user),
             ("max_budget", args.max_budget), ("budget_duration", args.budget_duration),
             ("rpm_limit", args.rpm), ("tpm_limit", args.tpm),
             ("duration", args.duration)]  # fmt: skip
    out.update({name: value for name, value in pairs if value is not None})
    if args.models is not None:
        out["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.metadata is not None:
        out["metadata"] = json.loads(args.metadata)
    return out


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, body) of the key API call a command stands for."""
    if args.command == "generate":
        return "POST", "/key/generate", _fields(args)
    if args.command == "update":
        return "POST", "/key/update", {"key": args.key, **_fields(args)}
    if args.command == "delete":
        return "POST", "/key/delete", {"keys": args.keys}
    if args.command == "info":
        return "GET", "/key/info?" + urlencode({"key": args.key}), None
    query = {"return_full_object": "true", "size": "100"}
    query.update({k: v for k, v in (("key_alias", args.alias), ("team_id", args.team)) if v})
    return "GET", "/key/list?" + urlencode(query), None


async def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    config = load_config(args.config or default_config_path())
    backend = open_backend(config)
    try:
        admin = KeyAdmin(backend.store, backend.limiter, config.general)
        method, path, body = _request(args)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="config.yaml (default: ./config.yaml, else defaults)")
    commands = parser.add_subparsers(dest="command", required=True)
    _key_options(commands.add_parser("generate", help="make a key (printed once)"))
    commands.add_parser("info", help="show a key").add_argument("key")
    update = commands.add_parser("update", help="change a key's fields")
    update.add_argument("key")
    _key_options(update)
    commands.add_parser("delete", help="delete keys").add_argument("keys", nargs="+")
    listing = commands.add_parser("list", help="list keys (first 100)")
    listing.add_argument("--alias")
    listing.add_argument("--team")
    args = parser.parse_args()
    try:
        status, body = asyncio.run(run(args))
    except (ConfigError, RuntimeError, ValueError) as e:
        print(f"keys: {e}", file=sys.stderr)
        return 2
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
