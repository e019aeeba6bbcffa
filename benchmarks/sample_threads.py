"""Where each thread's time goes: run a Python module or script while a sampler notes every thread's stack.

    python benchmarks/sample_threads.py --out DIR [--every-ms 2] -m xctrt bench --gpu ...
    python benchmarks/sample_threads.py --out DIR script.py args...

Every --every-ms the sampler reads sys._current_frames() and counts, per thread name, the innermost
frame in xctrt (python/xctrt or benchmarks) and the innermost frame of all (a C call shows as the
Python line that made it: a CUDA sync shows as the line that waits). A statistical profile of wall
time, not CPU time: a thread blocked in a sync or a queue is counted where it waits. The sampler takes
the GIL briefly at each sample (~1 % at 2 ms), so the run's own timings stay close to an unsampled run's.
The same counts are kept apart for the samples taken while the GPU stage streams slabs (its
xctrt-components thread is alive): the bench's timed runs of ours, without their set-up, the naive
anchor or the volume's generation.
Writes DIR/thread_samples.json and prints the top lines per thread when the run ends (or fails).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

OURS = (os.sep + "xctrt" + os.sep, os.sep + "benchmarks" + os.sep)
GPU_STAGE_THREAD = "xctrt-components"   # alive while the GPU stage streams slabs


class Sampler:
    def __init__(self, every_s: float):
        self.every_s = every_s
        self.ours = defaultdict(Counter)    # thread name -> "file:line function" of our innermost frame
        self.leaf = defaultdict(Counter)    # thread name -> innermost frame of any code
        self.samples = Counter()
        self.gpu_stage = {"ours": defaultdict(Counter), "leaf": defaultdict(Counter), "samples": Counter()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.every_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            tallies = [(self.samples, self.leaf, self.ours)]
            if GPU_STAGE_THREAD in names.values():
                tallies.append((self.gpu_stage["samples"], self.gpu_stage["leaf"], self.gpu_stage["ours"]))
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                leaf = _where(frame)
                f = frame
                while f is not None and not any(p in f.f_code.co_filename for p in OURS):
                    f = f.f_back
                for samples, leaves, ours in tallies:
                    samples[name] += 1
                    leaves[name][leaf] += 1
                    if f is not None:
                        ours[name][_where(f)] += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 12) -> dict:
        def tally(samples, leaf, ours):
            return {name: {"samples": n, "seconds": n * self.every_s,
                           "ours": [(k, v / n) for k, v in ours[name].most_common(top)],
                           "leaf": [(k, v / n) for k, v in leaf[name].most_common(top)]}
                    for name, n in samples.most_common()}
        g = self.gpu_stage
        return {"threads": tally(self.samples, self.leaf, self.ours),
                "while_gpu_stage_streams": tally(g["samples"], g["leaf"], g["ours"])}


def _where(frame) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in OURS:
        if marker in path:
            path = path[path.rindex(marker) + 1:]
            break
    else:
        path = Path(path).name
    return f"{path}:{frame.f_lineno} {code.co_name}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--every-ms", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("-m", dest="module", help="run this module as __main__ (as python -m)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="the script and its arguments, or the module's")
    args = ap.parse_args(argv)
    if not args.module and not args.rest:
        ap.error("give -m MODULE or a script")
    rc = 0
    t0 = time.perf_counter()
    with Sampler(args.every_ms / 1000.0) as s:
        old_argv = sys.argv
        try:
            if args.module:
                sys.argv = [args.module, *args.rest]
                runpy.run_module(args.module, run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(args.rest)
                runpy.run_path(args.rest[0], run_name="__main__")
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = old_argv
    wall = time.perf_counter() - t0
    rep = s.report(args.top)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "thread_samples.json.tmp"
    tmp.write_text(json.dumps({"wall_s": wall, "every_ms": args.every_ms, **rep}, indent=1))
    tmp.replace(args.out / "thread_samples.json")
    for part, title in (("threads", f"over {wall:.1f} s"),
                        ("while_gpu_stage_streams", f"while the GPU stage streamed slabs ({GPU_STAGE_THREAD} alive)")):
        print(f"\nthread samples every {args.every_ms} ms {title} (share of each thread's samples):")
        for name, r in rep[part].items():
            if r["seconds"] < 0.5:
                continue
            print(f"  {name}: {r['seconds']:.1f} s")
            for k, v in r["ours"][:8]:
                print(f"      {100 * v:5.1f} %  {k}")
            print("      innermost:")
            for k, v in r["leaf"][:5]:
                print(f"      {100 * v:5.1f} %  {k}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
