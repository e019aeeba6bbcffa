"""Spans of a run's timeline far longer than their kind's median, and what else ran long beside them
(xctrt.timing.stalled_spans; `xctrt bench --gpu` keeps the same per run as `stalls` in its JSON); and
how long labels.tif's writer worked after it took the last slab.

    python benchmarks/timeline_stalls.py bench.json [--runs ours] [--factor 3] [--min-ms 20] [--json out.json]
    python benchmarks/timeline_stalls.py out/summary.json                  # one `xctrt segment` run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from timeline_figure import runs_of  # noqa: E402

from xctrt.timing import stalled_spans  # noqa: E402


def writer_tail(run: dict) -> dict | None:
    """labels.tif's writer after it took the last slab: when it took it and how long it was busy then
    (the `write_close` span; a run from before that span: the writer's busy seconds less its `write`
    spans, since tifffile asks for no page past the last and the last slab's span was never recorded)."""
    timeline = run.get("timeline") or []
    close = [(a, b) for name, a, b in timeline if name == "write_close"]
    if close:
        took, done = close[0]
        return {"took_last_slab_s": took, "after_s": done - took, "total_s": run.get("total_s")}
    waits = [b for name, _, b in timeline if name == "write_wait"]
    busy = (run.get("stage_busy_s") or {}).get("write")
    if not waits or busy is None:
        return None
    spans = sum(b - a for name, a, b in timeline if name == "write")
    return {"took_last_slab_s": max(waits), "after_s": max(0.0, busy - spans), "total_s": run.get("total_s")}


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
        got = found[title] = stalled_spans(run["timeline"], args.factor, args.min_ms)
        writer = got["writer"] = writer_tail(run)
        print(f"{title}: {len(got['stalls'])} stalled spans; the compute stream's spans "
              f"{got['device_excess_s']:.3f} s past their medians"
              + ("" if writer is None else
                 f"; labels.tif's writer took its last slab at {writer['took_last_slab_s']:.3f} s and was busy "
                 f"{writer['after_s']:.3f} s after it" + ("" if writer["total_s"] is None else
                                                             f" (the run: {writer['total_s']:.3f} s)")))
        for s in got["stalls"]:
            beside = ", ".join(f"{b['kind']} {b['ms']:.0f} ms (median {b['median_ms']:.0f})" for b in s["beside"])
            print(f"  {s['start_s']:8.3f} s  {s['kind']:<16} {s['ms']:7.1f} ms (median {s['median_ms']:.1f})"
                  + (f"; beside it: {beside}" if beside else ""))
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
