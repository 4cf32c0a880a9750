"""Recent latency per deployment, for latency-based routing (LiteLLM's meaning).

Two kinds of sample: `latency`, seconds per output token of a whole answer (seconds when it has
none, e.g. embeddings), and `ttft`, seconds to a stream's first chunk. A stream is routed by
`ttft` where a deployment has some, everything else by `latency`. A timeout counts as
`PENALTY` seconds. The last `max_latency_list_size` samples of each kind are kept, and all of a
deployment's samples of a kind are forgotten `ttl` seconds after the last one (as a Redis key's
EXPIRE does, so local and shared samples age alike).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from mitmroute.config import StrategyArgs

LATENCY, TTFT = "latency", "ttft"
KINDS = (LATENCY, TTFT)
PENALTY = 1000.0
"""Seconds a timeout counts as (LiteLLM's)."""


class LatencyBook:
    def __init__(
        self, args: StrategyArgs | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.args = args or StrategyArgs()
        self._clock = clock
        self._samples: dict[tuple[str, str], deque[float]] = {}
        self._last: dict[tuple[str, str], float] = {}

    def record(self, deployment_id: str, kind: str, seconds: float) -> None:
        key = (deployment_id, kind)
        samples = self._fresh(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.args.max_latency_list_size)
        samples.appendleft(seconds)
        self._last[key] = self._clock()

    def samples(self, deployment_id: str, kind: str) -> list[float]:
        """Newest first."""
        return list(self._fresh((deployment_id, kind)) or ())

    def replace(self, deployment_id: str, kind: str, samples: Iterable[float]) -> None:
        """Samples read from the shared store (newest first), which has this process's too."""
        values = list(samples)[: self.args.max_latency_list_size]
        if not values:
            return
        key = (deployment_id, kind)
        self._samples[key] = deque(values, maxlen=self.args.max_latency_list_size)
        self._last[key] = self._clock()

    def average(self, deployment_id: str, stream: bool = False) -> float | None:
        """Mean recent latency of the kind that fits the request; None when unmeasured."""
        kinds = (TTFT, LATENCY) if stream else (LATENCY,)
        for kind in kinds:
            if samples := self.samples(deployment_id, kind):
                return sum(samples) / len(samples)
        return None

    def _fresh(self, key: tuple[str, str]) -> deque[float] | None:
        last = self._last.get(key)
        if last is not None and self._clock() - last > self.args.ttl:
            del self._samples[key], self._last[key]
        return self._samples.get(key)
