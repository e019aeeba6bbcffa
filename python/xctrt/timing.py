"""Busy seconds per stage and the spans behind them (summary.json's timing and timeline)."""
from __future__ import annotations

import gc
import statistics
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


# the compute stream's spans: their time past their kind's median is time the run lost
DEVICE_SPANS = ("encoder", "decoder", "model", "infer", "aggregate", "preprocess")


def stalled_spans(timeline, factor: float = 3.0, min_ms: float = 20.0, min_count: int = 5) -> dict:
    """Spans of a run's timeline far longer than their kind's median, and what else ran long beside them:
    {"kinds": {kind: {count, median_ms, max_ms}}, "stalls": [...], "device_excess_s"}.

    A repeated stage (encoder, decoder, read, main stage, components ...) whose span takes several times
    its median did not do more work than the others: something held it up. Only kinds of work with at
    least min_count spans count (not the waits and idle gaps, which are the stalls' effects, nor the
    zero-length hand-over marks). A stall is a span longer than factor x its kind's median and at least
    min_ms past it, listed with the other kinds' stalled spans that overlap it: when the host threads'
    spans all stretch together, the process as a whole stood still (the GIL held by one thread, as a full
    pass of Python's garbage collector holds it). Device spans are placed by CUDA events, so one stretches
    when the host queued its work late; device_excess_s sums the compute stream's spans' excess."""
    by_kind = {}
    for name, t0, t1 in timeline:
        if "wait" not in name and "idle" not in name and t1 - t0 >= 1e-4:
            by_kind.setdefault(name, []).append((t0, t1))
    medians = {k: statistics.median(t1 - t0 for t0, t1 in v) for k, v in by_kind.items() if len(v) >= min_count}

    def stretched(name, t0, t1):
        med = medians.get(name)
        return med is not None and (t1 - t0) > factor * med and (t1 - t0) - med >= min_ms / 1e3

    long = [(name, t0, t1) for name, v in by_kind.items() for t0, t1 in v if stretched(name, t0, t1)]
    out = []
    for name, t0, t1 in sorted(long, key=lambda s: s[1]):
        beside = [{"kind": n, "start_s": round(a, 4), "ms": round((b - a) * 1e3, 1),
                   "median_ms": round(medians[n] * 1e3, 1)}
                  for n, a, b in long if n != name and a < t1 and b > t0]
        out.append({"kind": name, "start_s": round(t0, 4), "ms": round((t1 - t0) * 1e3, 1),
                    "median_ms": round(medians[name] * 1e3, 1), "beside": beside})
    excess = sum((t1 - t0) - medians[name] for name, t0, t1 in long if name in DEVICE_SPANS)
    kinds = {k: {"count": len(by_kind[k]), "median_ms": round(m * 1e3, 2),
                 "max_ms": round(max(t1 - t0 for t0, t1 in by_kind[k]) * 1e3, 2)} for k, m in sorted(medians.items())}
    return {"kinds": kinds, "stalls": out, "device_excess_s": round(excess, 4)}
