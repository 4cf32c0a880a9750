#!/usr/bin/env python3
"""Write a CA bundle that clients can trust: certifi's roots plus mitmproxy's CA.

`SSL_CERT_FILE` / `REQUESTS_CA_BUNDLE` *replace* a client's CA bundle, so they need both in one
file. Node adds to its own roots with `NODE_EXTRA_CA_CERTS=<confdir>/mitmproxy-ca-cert.pem`.
The CA is created in the confdir when it doesn't exist yet (as mitmdump would).

    python scripts/ca_bundle.py [--confdir ~/.mitmproxy] [--out mitmroute-ca-bundle.pem]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import certifi
from mitmproxy.certs import CertStore


def write_bundle(confdir: Path, out: Path) -> Path:
    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(confdir, "mitmproxy", 2048)  # creates the CA if missing
    ca = (confdir / "mitmproxy-ca-cert.pem").read_text()
    out.write_text(Path(certifi.where()).read_text().rstrip("\n") + "\n" + ca)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--confdir", type=Path, default=Path("~/.mitmproxy").expanduser())
    parser.add_argument("--out", type=Path, default=Path("mitmroute-ca-bundle.pem"))
    args = parser.parse_args()
    out = write_bundle(args.confdir, args.out)
    print(f"wrote {out}: certifi roots + {args.confdir / 'mitmproxy-ca-cert.pem'}")
    print(
        f"  Python (openai, requests, httpx): export SSL_CERT_FILE={out.resolve()} "
        f"REQUESTS_CA_BUNDLE={out.resolve()}"
    )
    print(f"  Node: export NODE_EXTRA_CA_CERTS={args.confdir / 'mitmproxy-ca-cert.pem'}")
    print(f"  curl: --cacert {out.resolve()}")


if __name__ == "__main__":
    main()
