"""A profiling addon for `scripts/profile_hotpath.py`: load it first with `-s`.

    mitmdump -s scripts/profile_addon.py -s addons/router.py --set profile_out=/tmp/p

`profile_out` set: cProfile runs on the event loop's thread from `running` to `done` and its
stats go to `<profile_out>.pstats`. `profile_memory` set: tracemalloc's top allocation sites
(by file) go to `<profile_out>.mem.txt` at `done`. Neither is for production use.
"""

from __future__ import annotations

import cProfile
import tracemalloc
from pathlib import Path

from mitmproxy import ctx


class Profile:
    def __init__(self) -> None:
        self.profiler: cProfile.Profile | None = None

    def load(self, loader) -> None:
        loader.add_option("profile_out", str, "", "Path prefix for the profile's files.")
        loader.add_option("profile_cpu", bool, False, "Run cProfile on the event loop.")
        loader.add_option("profile_memory", bool, False, "Write tracemalloc's top sites.")

    def running(self) -> None:
        if ctx.options.profile_cpu:
            self.profiler = cProfile.Profile()
            self.profiler.enable()

    def done(self) -> None:
        out = ctx.options.profile_out
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(f"{out}.pstats")
        if ctx.options.profile_memory and tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            lines = [f"traced {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB"]
            for stat in snapshot.statistics("filename")[:60]:
                lines.append(f"{stat.size / 2**20:8.2f} MB {stat.count:8d} {stat.traceback}")
            Path(f"{out}.mem.txt").write_text("\n".join(lines) + "\n")


addons = [Profile()]
