"""Busy seconds per stage and the spans behind them (summary.json's timing and timeline)."""
from __future__ import annotations

import gc
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

    def add_seconds(self, stage: str, seconds: float) -> None:
        """Busy seconds without a span of their own (work inside another span, as defects.csv's writes)."""
        with self._lock:
            self.seconds[stage] += seconds

    def add_span(self, stage: str, t0: float, t1: float) -> None:
        """A span for the timeline only (its seconds are counted some other way)."""
        with self._lock:
            self.spans.append((stage, t0, t1))


class CollectorWatch:
    """Python's cyclic garbage collector during a run (a context manager). The objects that exist when
    the run begins (torch, the model, CuPy, the caller's) are frozen out of the collector's passes
    (gc.freeze) until the last run in the process ends: a full pass over a process holding torch walks
    hundreds of thousands of objects (0.13 s on a 2-core VM: benchmarks/host_tail_costs.py) and stalls
    whichever thread triggers it, mid-table or mid-stage. Each full pass that still happens is kept as a
    "gc" span for the timeline; summary() gives the passes and seconds per generation."""

    _lock = threading.Lock()
    _runs = 0   # runs in progress in this process: the first freezes, the last unfreezes

    def __init__(self):
        self.spans: list[tuple[str, float, float]] = []
        self.passes, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]
        self.frozen = 0
        self._t0 = None

    def __enter__(self) -> CollectorWatch:
        with CollectorWatch._lock:
            if CollectorWatch._runs == 0:
                gc.freeze()
            CollectorWatch._runs += 1
            self.frozen = gc.get_freeze_count()
        gc.callbacks.append(self._pass)
        return self

    def __exit__(self, *exc) -> None:
        if self._pass in gc.callbacks:   # (unless other code cleared the list meanwhile)
            gc.callbacks.remove(self._pass)
        with CollectorWatch._lock:
            CollectorWatch._runs -= 1
            if CollectorWatch._runs == 0:
                gc.unfreeze()

    def _pass(self, phase: str, info: dict) -> None:   # called with the GIL held: one pass at a time
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        if self._t0 is None:   # a pass that began before this watch did
            return
        t1, gen = time.perf_counter(), info["generation"]
        self.passes[gen] += 1
        self.seconds[gen] += t1 - self._t0
        if gen == 2:
            self.spans.append(("gc", self._t0, t1))
        self._t0 = None

    def summary(self) -> dict:
        """For summary.json's timing: objects frozen out of the passes, passes and seconds per generation."""
        return {"frozen_objects": self.frozen, "passes": list(self.passes),
                "seconds": [round(v, 4) for v in self.seconds]}
