"""Busy seconds per stage and the spans behind them (summary.json's timing and timeline)."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

# summary.json's timing keys for the defect table's distance-to-surface search (None where it was not
# timed apart from the table: the C++ labeller's), and the device labeller's outside-air parts
TABLE_SURFACE_KEYS = ("table_parts_s", "table_surface_runs", "gpu_surface_search_not_used_because",
                      "outside_air_detail")


class StageTimer:
    """Busy seconds per stage, and each span of them (perf_counter start and end) for the timeline.
    Threads share one: every change is made under its lock."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.spans: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(stage, t0, time.perf_counter())

    def record(self, stage: str, t0: float, t1: float) -> None:
        """A span that counts as busy time."""
        with self._lock:
            self.seconds[stage] += t1 - t0
            self.spans.append((stage, t0, t1))

    def add_span(self, stage: str, t0: float, t1: float) -> None:
        """A span for the timeline only (its seconds are counted some other way)."""
        with self._lock:
            self.spans.append((stage, t0, t1))
