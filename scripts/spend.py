#!/usr/bin/env python3
"""`mitmroute spend` under its old name: the spend log as a table, SQL, or Parquet.

    python scripts/spend.py [--config C] [--db spend.duckdb] [--since 24h] [--by team,model]
                            [--export out.parquet] [--export-rows rows.parquet] [--sql QUERY]

Needs the project's virtualenv (`make test` or `make run` creates it); `.venv/bin/mitmroute
spend` is the same command. See `mitmroute spend --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mitmroute.cli import main

if __name__ == "__main__":
    sys.exit(main(["spend", *sys.argv[1:]]))
