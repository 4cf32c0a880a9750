#!/usr/bin/env python3
"""`mitmroute ca` under its old name: certifi's roots plus mitmproxy's CA in one file.

    python scripts/ca_bundle.py [--confdir ~/.mitmproxy] [--out mitmroute-ca.pem]

Needs the project's virtualenv (`make test` or `make run` creates it); `.venv/bin/mitmroute ca`
is the same command, and `mitmroute env` writes the bundle and prints every variable at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mitmroute.cli import main

if __name__ == "__main__":
    sys.exit(main(["ca", *sys.argv[1:]]))
