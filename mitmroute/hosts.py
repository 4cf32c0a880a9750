"""Host names as mitmroute compares them: lowercased, without the trailing dot of the root.

`API.OpenAI.com.` and `api.openai.com` are one host to DNS and to TLS; a comparison that treats
them as two lets traffic for an intercepted host slip past as "some other host".
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmroute.config import GeneralSettings, RouterConfig
from mitmroute.gate import canonical_host

__all__ = ["HostSet", "canonical_host"]


class HostSet:
    """A set of host names, matched canonically."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(canonical_host(n) for n in names if canonical_host(n))

    def match(self, *candidates: str | None) -> str | None:
        """The first candidate that names a host of the set (canonical form), else None."""
        for candidate in candidates:
            if candidate and (host := canonical_host(candidate)) in self.names:
                return host
        return None

    def __repr__(self) -> str:
        return f"HostSet({sorted(self.names)})"


def intercepted_hosts(config: RouterConfig | None) -> HostSet:
    """The hosts a config intercepts (the built-in default before one is loaded)."""
    general = config.general if config is not None else GeneralSettings()
    return HostSet(general.intercept_hosts)
