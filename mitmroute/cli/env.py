"""`mitmroute env`: the environment an app's shell needs to go through the proxy, as
`export NAME=value` lines (or fish / PowerShell): `eval "$(mitmroute env)"`.

- `HTTPS_PROXY` (and `https_proxy`, which some clients read first): the proxy.
- `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`: a bundle of certifi's roots plus
  mitmproxy's CA (these variables replace a client's roots; Python, curl, Go, Codex read them).
- `NODE_EXTRA_CA_CERTS`: mitmproxy's CA, added to Node's own roots.
- Node's built-in `fetch` (the `openai` npm package v5+) ignores the proxy variables:
  `NODE_USE_ENV_PROXY=1` makes Node >= 24 honour them, and `NODE_OPTIONS=--require
  <env-proxy.cjs>` does it on older Node with a preload shipped in this package (no npm
  install; it steps aside where Node's own env proxy is on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from mitmroute.cli.ca import CA_CERT, add_confdir_option, write_bundle
from mitmroute.cli.errors import CliError
from mitmroute.cli.shell import SHELLS, assignment

DEFAULT_PROXY = "http://127.0.0.1:8080"
BUNDLE = "mitmroute-ca-bundle.pem"
PRELOAD = Path(__file__).resolve().parent / "node" / "env-proxy.cjs"


def proxy_url(value: str) -> str:
    """`value` if it is an http(s)://host[:port] URL, else CliError."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise CliError(f"--proxy {value}: bad port", code=2) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--proxy {value}: expected http://HOST:PORT", code=2)
    return value.rstrip("/")


def node_options(current: str, preload: Path) -> str:
    """`current` NODE_OPTIONS with `--require <preload>` added once."""
    path = str(preload)
    if path in current:
        return current
    require = f'--require "{path}"' if " " in path else f"--require {path}"
    return f"{current} {require}".strip()


def variables(proxy: str, confdir: Path, bundle: Path) -> list[tuple[str, str]]:
    """The (name, value) pairs to export, in order."""
    ca = str(confdir.expanduser().resolve() / CA_CERT)
    return [
        ("HTTPS_PROXY", proxy),
        ("https_proxy", proxy),
        ("SSL_CERT_FILE", str(bundle)),
        ("REQUESTS_CA_BUNDLE", str(bundle)),
        ("CURL_CA_BUNDLE", str(bundle)),
        ("NODE_EXTRA_CA_CERTS", ca),
        ("NODE_USE_ENV_PROXY", "1"),
        ("NODE_OPTIONS", node_options(os.environ.get("NODE_OPTIONS", ""), PRELOAD)),
    ]


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "env",
        help="print the environment an app needs to go through the proxy (eval it)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--proxy",
        default=DEFAULT_PROXY,
        metavar="URL",
        help=f"the proxy's URL (default: {DEFAULT_PROXY}, where `mitmroute run` listens)",
    )
    add_confdir_option(p)
    p.add_argument(
        "--bundle",
        type=Path,
        metavar="FILE",
        help=f"where to write the CA bundle (default: <confdir>/{BUNDLE})",
    )
    p.add_argument("--shell", choices=SHELLS, default="sh", help="syntax (default: sh)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    proxy = proxy_url(args.proxy)
    bundle = write_bundle(args.confdir, args.bundle or args.confdir / BUNDLE)
    print(f"mitmroute env: proxy {proxy}, CA bundle {bundle}", file=sys.stderr)
    for name, value in variables(proxy, args.confdir, bundle):
        print(assignment(args.shell, name, value))
    return 0
