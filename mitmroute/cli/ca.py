"""`mitmroute ca`: the CA bundle clients trust: certifi's roots plus mitmproxy's CA, one file.

`SSL_CERT_FILE` / `REQUESTS_CA_BUNDLE` / `CURL_CA_BUNDLE` *replace* a client's roots, so they
need both in one file; Node adds to its roots with `NODE_EXTRA_CA_CERTS=<confdir>/<CA cert>`.
The CA is created in the confdir when missing, as mitmdump would on its first start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mitmroute.cli.errors import CliError
from mitmroute.cli.shell import invoked_as

DEFAULT_CONFDIR = Path("~/.mitmproxy")
CA_CERT = "mitmproxy-ca-cert.pem"


def ca_cert(confdir: Path) -> Path:
    return confdir.expanduser() / CA_CERT


def ensure_ca(confdir: Path) -> Path:
    """mitmproxy's CA certificate in `confdir`, created (with its key) when missing."""
    from mitmproxy.certs import CertStore

    confdir = confdir.expanduser()
    try:
        confdir.mkdir(parents=True, exist_ok=True)
        CertStore.from_store(confdir, "mitmproxy", 2048)
    except OSError as e:
        raise CliError(f"cannot create mitmproxy's CA in {confdir}: {e.strerror or e}") from None
    return ca_cert(confdir)


def write_bundle(confdir: Path, out: Path) -> Path:
    """Write certifi's roots plus mitmproxy's CA to `out`; return its absolute path."""
    import certifi

    ca = ensure_ca(confdir).read_text()
    roots = Path(certifi.where()).read_text().rstrip("\n")
    out = out.expanduser().resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"{roots}\n{ca}")
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def add_confdir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--confdir",
        type=Path,
        default=DEFAULT_CONFDIR,
        metavar="DIR",
        help="mitmproxy's confdir, where its CA lives (default: ~/.mitmproxy, as mitmdump's)",
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "ca",
        help="write the CA bundle apps trust (certifi roots + mitmproxy's CA)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_confdir_option(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("mitmroute-ca.pem"),
        metavar="FILE",
        help="where to write the bundle (default: ./mitmroute-ca.pem)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = write_bundle(args.confdir, args.out)
    ca = ca_cert(args.confdir)
    print(f"wrote {out}: certifi roots + {ca}")
    print(f"  Python, curl, Go: export SSL_CERT_FILE={out} REQUESTS_CA_BUNDLE={out}")
    print(f"  Node:             export NODE_EXTRA_CA_CERTS={ca}")
    print(f'  everything at once, proxy included: eval "$({invoked_as()} env)"')
    return 0
