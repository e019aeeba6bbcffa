"""When each stage of a run worked, from its timeline -> PNG (one panel per run).

    python benchmarks/timeline_figure.py out/summary.json timeline.png            # one `xctrt segment` run
    python benchmarks/timeline_figure.py bench.json timeline.png [--runs ours ours-host]   # `xctrt bench --gpu`

summary.json's timeline (its last item) holds every span of every stage, in seconds since the run began: the
host threads' (read, components, write, table, report), the device streams' (h2d, preprocess,
encoder, decoder, aggregate, components, d2h: CUDA events on the host's clock), the compute stream's
idle gaps between slabs, and what the main thread waited on ("main ..."). A bench JSON holds one
timeline per mode and run. One row per stage, in the order the data flows; the compute stream's idle
gaps in red. The picture shows what a table of busy seconds cannot: the fill before the device starts,
the gaps where it waits, and the tail after the last slab.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# stages in the order the data flows, each with its colour; stages not listed go after them in grey
STAGES = [("read", (120, 120, 120)), ("fused_check", (200, 160, 60)), ("capture", (200, 160, 60)), ("tile", (90, 150, 200)),
          ("pin", (150, 150, 200)), ("h2d", (90, 150, 200)), ("preprocess", (60, 130, 190)), ("infer", (40, 110, 200)),
          ("model", (40, 110, 200)), ("encoder", (40, 110, 200)), ("decoder", (90, 80, 200)),
          ("stitch", (70, 170, 120)), ("aggregate", (70, 170, 120)), ("compute_idle", (220, 50, 50)),
          ("components", (230, 140, 40)), ("d2h", (150, 110, 60)), ("write", (150, 110, 60)),
          ("write_wait", (215, 215, 215)),   # the writer thread waiting for labels
          ("write_close", (150, 110, 60)),   # the writer after its last slab: its last batch, the file closed
          ("table", (180, 60, 150)), ("table outside air", (200, 90, 170)), ("table merge", (200, 90, 170)),
          ("table surface", (200, 90, 170)), ("table columns", (200, 90, 170)), ("fill", (180, 60, 150)), ("preview", (120, 60, 160)),
          ("csv", (120, 60, 160)), ("csv_write", (150, 110, 60)), ("report", (120, 60, 160)),
          ("gc", (220, 50, 50))]   # Python's garbage collector's full passes (they stall the thread that set them off)
MAIN = (170, 170, 170)   # the main thread's rows
OTHER = (110, 110, 110)


def runs_of(doc: dict, names=None) -> list[tuple[str, dict]]:
    """(title, timing) per run: a summary.json is one run, a bench JSON one per mode and run."""
    if "timing" in doc:
        if not doc.get("timeline"):
            raise SystemExit("no timeline in this summary.json (written by an xctrt before the timeline)")
        return [(f"{doc['input']['path']}  {doc['input']['shape']}  {doc['run']['pipeline']} pipeline",
                 {**doc["timing"], "timeline": doc["timeline"]})]
    out = []
    for mode, runs in doc.get("modes", {}).items():
        for name, run in runs.items():
            if isinstance(run, dict) and run.get("timeline") and (not names or name in names):
                out.append((f"{mode} mode, {name}: {run['slices']} slices, {run['slices_per_s']:.1f} slices/s", run))
    if not out:
        raise SystemExit("no run with a timeline here (xctrt before the timeline, or --runs names none)")
    return out


def row_order(timeline: list) -> list[str]:
    seen = {name for name, _, _ in timeline}
    known = [s for s, _ in STAGES if s in seen]
    main = sorted(s for s in seen if s.startswith("main "))
    return known + sorted(seen - set(known) - set(main)) + main


def colour(stage: str):
    return MAIN if stage.startswith("main ") else dict(STAGES).get(stage, OTHER)


def draw(runs: list[tuple[str, dict]], out: Path, width: int = 1100) -> dict:
    """Draw the panels; returns where each panel's rows and time axis are ({title: layout}), for tests."""
    font = ImageFont.load_default()
    label_w, row_h, head, foot = 130, 14, 22, 22
    plot_w = width - label_w - 20
    heights = [head + row_h * len(row_order(t["timeline"])) + foot for _, t in runs]
    img = Image.new("RGB", (width, sum(heights) + 10), "white")
    d = ImageDraw.Draw(img)
    layout, y0 = {}, 5
    for (title, timing), h in zip(runs, heights):
        timeline = timing["timeline"]
        rows = row_order(timeline)
        end = max(timing.get("total_s") or 0.0, max(b for _, _, b in timeline)) or 1.0
        scale = plot_w / end
        d.text((10, y0 + 4), f"{title}   total {end:.2f} s", fill="black", font=font)
        top = y0 + head
        for i, stage in enumerate(rows):
            y = top + i * row_h
            d.text((10, y + 1), stage, fill="black", font=font)
            if i % 2:
                d.rectangle([label_w, y, label_w + plot_w, y + row_h - 1], fill=(246, 246, 246))
        for stage, a, b in timeline:
            y = top + rows.index(stage) * row_h
            x0 = label_w + int(a * scale)
            d.rectangle([x0, y + 2, max(x0, label_w + int(b * scale) - 1), y + row_h - 3], fill=colour(stage))
        axis = top + len(rows) * row_h
        d.line([label_w, axis, label_w + plot_w, axis], fill="black")
        step = _tick(end)
        t = 0.0
        while t <= end + 1e-9:
            x = label_w + int(t * scale)
            d.line([x, axis, x, axis + 3], fill="black")
            d.text((x - 6, axis + 5), f"{t:g} s", fill="black", font=font)
            t += step
        layout[title] = {"rows": rows, "top": top, "row_h": row_h, "left": label_w, "scale": scale}
        y0 += h
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return layout


def _tick(end: float) -> float:
    """A round tick step giving 5-12 ticks over [0, end]."""
    step = 10.0 ** int(f"{end / 10:e}".split("e")[1])
    for m in (1, 2, 5, 10):
        if end / (step * m) <= 12:
            return step * m
    return step * 10


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a run's summary.json or an `xctrt bench --gpu` JSON")
    ap.add_argument("png")
    ap.add_argument("--runs", nargs="*", help="bench runs to draw (e.g. ours ours-host; default all)")
    args = ap.parse_args(argv)
    return draw(runs_of(json.loads(Path(args.json).read_text()), args.runs), Path(args.png))


if __name__ == "__main__":
    main()
