"""Simulated scans next to what `xctrt segment` made of them: the figure of simulate_recovery.sh.

    PYTHONPATH=python:. python benchmarks/simulate_recovery_figure.py WORK NAME [NAME ...] -o OUT.png [--palette 256]

One row per NAME (WORK/NAME: an `xctrt simulate` folder; WORK/seg-NAME: the segment run; WORK/eval-NAME.json:
`xctrt evaluate`), the middle slice: the simulation's labels, then the run's, both over the simulated grey
values in the run's intensity window, with the air the run's labels enclose (3D, as summary.json counts it)
in magenta. --palette N saves N colours (a third of the bytes, for docs/; the colours then approximate).
docs/simulate_segment.png: `... /tmp/simseg v360 v60 cu8 -o docs/simulate_segment.png --palette 256`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from enclosed_air import outside_air  # noqa: E402
from xctrt.metrics import fmt_value  # noqa: E402
from xctrt.preview import ENCLOSED, ENCLOSED_NAME, _blend, _overlay  # noqa: E402

PANEL = 300   # pixels per panel side


def row(work: Path, name: str) -> tuple[str, list[Image.Image]]:
    image = tifffile.imread(work / name / "image.tif")
    truth = tifffile.imread(work / name / "labels.tif")
    pred = tifffile.imread(work / f"seg-{name}" / "labels.tif")
    summary = json.loads((work / f"seg-{name}" / "summary.json").read_text())
    ev = json.loads((work / f"eval-{name}.json").read_text())
    sim = json.loads((work / name / "simulate.json").read_text())["config"]
    z = len(image) // 2
    mid = pred[z].copy()
    mid[(mid == 0) & ~outside_air(pred)[z]] = ENCLOSED
    lo, hi = summary["run"]["intensity_window"]
    panels = [_overlay(image[z], lab, lo, hi).resize((PANEL, PANEL), Image.NEAREST) for lab in (truth[z], mid)]
    iou = ev["classes"]
    filt = "{} {} mm pre-filter".format(*sim["beam_filter"]) if sim["beam_filter"] else "no pre-filter"
    title = (f"{name}: {sim['views']} views, {filt}, slice {z} of {len(image)}   IoU "
             + ", ".join(f"{k} {fmt_value(iou[k]['iou'], 2)}" for k in ("material", "pore", "inclusion")))
    return title, panels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("names", nargs="+")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--palette", type=int, metavar="N", help="an N-colour palette PNG (2..256)")
    a = ap.parse_args(argv)
    if a.palette is not None and not 2 <= a.palette <= 256:
        ap.error("--palette takes 2..256 colours")
    rows = [row(a.work, n) for n in a.names]
    pad, head, legend_h = 8, 34, 26
    width = 2 * PANEL + 3 * pad
    height = len(rows) * (head + PANEL + pad) + legend_h + pad
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for title, panels in rows:
        first, _, rest = title.partition("   ")
        draw.text((pad, y), first, fill=(230, 230, 230))
        draw.text((pad, y + 12), rest, fill=(200, 200, 200))
        for i, (p, label) in enumerate(zip(panels, ("simulated labels", "xctrt segment (default model)"))):
            x = pad + i * (PANEL + pad)
            canvas.paste(p, (x, y + head))
            draw.text((x + 4, y + head + 2), label, fill=(255, 255, 255))
        y += head + PANEL + pad
    x = pad
    for cid, label in ((1, "material"), (2, "pore"), (3, "inclusion"), (ENCLOSED, ENCLOSED_NAME)):
        swatch = tuple(int(v) for v in _blend(np.full(3, 128, np.float32), cid))   # as drawn over mid grey
        draw.rectangle([x, y + 4, x + 14, y + 18], fill=swatch)
        draw.text((x + 20, y + 5), label, fill=(230, 230, 230))
        x += 20 + round(draw.textlength(label)) + 18
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.palette:
        canvas = canvas.quantize(a.palette, method=Image.Quantize.MAXCOVERAGE)   # keeps rare colours (inclusions)
    canvas.save(a.out, format="PNG", optimize=True)
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
