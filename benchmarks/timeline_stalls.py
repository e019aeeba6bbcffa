"""Spans of a run's timeline far longer than their kind's median, and what else ran long beside them.

    python benchmarks/timeline_stalls.py bench.json [--runs ours] [--factor 3] [--min-ms 20] [--json out.json]
    python benchmarks/timeline_stalls.py out/summary.json                  # one `xctrt segment` run

A repeated stage (encoder, decoder, read, main stage, components ...) whose span takes several times its
median did not do more work than the others: something held it up. Device spans are placed by CUDA
events, so a device span stretches when the host queued its work late. When the host threads' spans all
stretch over the same interval (the main thread's stage, the reader, the labeller), the process as a whole
stood still: the GIL held by one thread, as a full pass of Python's garbage collector holds it. The
excess (duration minus the kind's median) of the compute stream's spans is time the run lost.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timeline_figure import runs_of  # noqa: E402

DEVICE = ("encoder", "decoder", "model", "infer", "aggregate", "preprocess")   # the compute stream's spans


def stalls(timeline: list, factor: float = 3.0, min_ms: float = 20.0, min_count: int = 5) -> dict:
    """{"kinds": {kind: {count, median_ms, max_ms}}, "stalls": [...], "device_excess_s"} for the
    kinds of work with at least min_count spans (not the waits and idle gaps, not the zero-length
    hand-over marks); a stall is a span longer than factor x its kind's median and at least min_ms past
    it, listed with the other kinds' stalled spans that overlap it."""
    by_kind = {}
    for name, t0, t1 in timeline:
        # waits and idle gaps are the stalls' effects, not work; zero-length spans mark hand-overs
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
    excess = sum((t1 - t0) - medians[name] for name, t0, t1 in long if name in DEVICE)
    kinds = {k: {"count": len(by_kind[k]), "median_ms": round(m * 1e3, 2),
                 "max_ms": round(max(t1 - t0 for t0, t1 in by_kind[k]) * 1e3, 2)} for k, m in sorted(medians.items())}
    return {"kinds": kinds, "stalls": out, "device_excess_s": round(excess, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("timing", type=Path, help="a bench JSON (xctrt bench --gpu) or an xctrt segment summary.json")
    ap.add_argument("--runs", nargs="*", help="bench runs to read (default: all with a timeline)")
    ap.add_argument("--factor", type=float, default=3.0, help="a stall is longer than this x its kind's median")
    ap.add_argument("--min-ms", type=float, default=20.0, help="... and at least this many ms past it")
    ap.add_argument("--json", type=Path, help="also save the findings here")
    args = ap.parse_args(argv)
    found = {}
    for title, run in runs_of(json.loads(args.timing.read_text()), args.runs):
        got = found[title] = stalls(run["timeline"], args.factor, args.min_ms)
        print(f"{title}: {len(got['stalls'])} stalled spans; the compute stream's spans "
              f"{got['device_excess_s']:.3f} s past their medians")
        for s in got["stalls"]:
            beside = ", ".join(f"{b['kind']} {b['ms']:.0f} ms (median {b['median_ms']:.0f})" for b in s["beside"])
            print(f"  {s['start_s']:8.3f} s  {s['kind']:<16} {s['ms']:7.1f} ms (median {s['median_ms']:.1f})"
                  + (f"; beside it: {beside}" if beside else ""))
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
