"""mitmroute: `mitmdump -s addons/router.py [--set router_config=config.yaml]`.

Assembles the addon chain. Order matters: each addon sees a request after the ones before it.
The Gate decides first what becomes of a request to an intercepted host; the Seal, last, makes
sure that it became exactly that (see mitmroute/addons/gate.py).
"""

from mitmroute.addons.alerts import Alerts
from mitmroute.addons.auth import KeyAuth
from mitmroute.addons.client_timeouts import ClientTimeouts
from mitmroute.addons.console import Console
from mitmroute.addons.dials import DialGuard
from mitmroute.addons.gate import Gate, Seal
from mitmroute.addons.lazy_connect import LazyConnect
from mitmroute.addons.metrics import Metrics
from mitmroute.addons.router import Router
from mitmroute.addons.shared import Shared
from mitmroute.addons.spend import SpendLog
from mitmroute.addons.tunnels import TunnelGuard

shared = Shared()

addons = [
    LazyConnect(),
    TunnelGuard(shared),
    DialGuard(shared),
    ClientTimeouts(),
    Gate(shared),
    KeyAuth(shared),
    Router(shared),
    SpendLog(shared),
    Metrics(shared),
    Alerts(shared),
    Console(shared),
    Seal(shared),
]
