#!/usr/bin/env bash
# Create the virtualenv with a Python >= 3.12 (mitmproxy 12 needs it) and install mitmroute into it.
set -euo pipefail
venv=${1:-.venv}
find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 ~/.pyenv/versions/3.13.*/bin/python ~/.pyenv/versions/3.12.*/bin/python python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "mitmroute needs Python >= 3.12 (set PYTHON=/path/to/python3.12)" >&2
  return 1
}
py=$(find_python)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[dev]'
# the shared ledger's DuckDB extensions, copied where DuckDB loads them offline
"$venv/bin/python" -m mitmroute.spend.extensions
# the fleet tests (tests/scaleout) run proxies behind HAProxy, from Debian's package
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing HAProxy (apt-get install -y haproxy) for tests/scaleout" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
  else
    echo "HAProxy is missing: tests/scaleout needs it. Install it as root:" \
      "apt-get install -y haproxy (or your system's haproxy package, 2.x)" >&2
  fi
fi
