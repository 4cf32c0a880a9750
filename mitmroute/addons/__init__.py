"""The mitmproxy addons, one concern each; `addons/router.py` assembles them into a chain."""
