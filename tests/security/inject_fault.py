"""Loaded after addons/router.py by the fail-closed tests (`-s tests/security/inject_fault.py`).

`MITMROUTE_INJECT_FAULT=Router.request,Gate.request` makes each named hook raise, through the
`__wrapped__` seam that `mitmroute.addons.guard.fail_closed` calls the real hook by.
"""

from __future__ import annotations

import inspect
import os

from mitmroute.addons.alerts import Alerts
from mitmroute.addons.auth import KeyAuth
from mitmroute.addons.console import Console
from mitmroute.addons.gate import Gate, Seal
from mitmroute.addons.lazy_connect import LazyConnect
from mitmroute.addons.metrics import Metrics
from mitmroute.addons.router import Router
from mitmroute.addons.spend import SpendLog

ADDONS = {
    cls.__name__: cls
    for cls in (Alerts, KeyAuth, Console, Gate, Seal, LazyConnect, Metrics, Router, SpendLog)
}


def inject(spec: str) -> None:
    name, hook = spec.split(".")
    guarded = getattr(ADDONS[name], hook)
    message = f"fault injected into {spec}"

    if inspect.iscoroutinefunction(guarded.__wrapped__):

        async def failing_async(self, *args):
            raise RuntimeError(message)

        guarded.__wrapped__ = failing_async
    else:

        def failing(self, *args):
            raise RuntimeError(message)

        guarded.__wrapped__ = failing


for spec in filter(None, os.environ.get("MITMROUTE_INJECT_FAULT", "").split(",")):
    inject(spec.strip())
