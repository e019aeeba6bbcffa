"""Spans of a run's timeline far longer than their kind's median, and what else ran long beside them
(xctrt.timing.stalled_spans; `xctrt bench --gpu` keeps the same per run as `stalls` in its JSON).

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
