"""Peak resident memory per export stage, for the manifest (`coreml.peak_rss_gb`): the process's peak so far
(`getrusage` `ru_maxrss`) read at the end of each progress step, so the first step whose figure reaches the
final peak is where the peak sits. Costs one system call per step."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from typing import Any


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class PeakRss:
    """`watch(progress).step(label)` runs `progress.step(label)` and records the peak after it in `peaks`."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    def watch(self, progress: Any) -> _Watched:
        return _Watched(self, progress)


class _Watched:
    def __init__(self, rss: PeakRss, progress: Any) -> None:
        self.rss, self.progress = rss, progress

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        with self.progress.step(label):
            yield
        self.rss.peaks[label] = round(peak_rss_gb(), 3)

    def note(self, message: str) -> None:
        self.progress.note(message)
