"""mitmroute: `mitmdump -s addons/router.py [--set router_config=config.yaml]`.

Assembles the addon chain. Order matters: each addon sees a request after the ones before it.
"""

from mitmroute.addons.console import Console
from mitmroute.addons.lazy_connect import LazyConnect
from mitmroute.addons.router import Router
from mitmroute.addons.shared import Shared

shared = Shared()

addons = [
    LazyConnect(),
    Router(shared),
    Console(shared),
]
