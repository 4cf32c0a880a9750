#!/usr/bin/env python3
"""`mitmroute keys` under its old name: virtual keys without a running proxy.

    python scripts/keys.py [--config config.yaml] generate|info|update|delete|list ...

Needs the project's virtualenv (`make test` or `make run` creates it); `.venv/bin/mitmroute
keys` is the same command. See `mitmroute keys --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mitmroute.cli import main

if __name__ == "__main__":
    sys.exit(main(["keys", *sys.argv[1:]]))
