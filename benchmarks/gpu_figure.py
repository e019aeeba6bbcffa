"""Where the time goes per slice, naive vs ours, from an `xctrt bench --gpu` JSON -> PNG.

    python benchmarks/gpu_figure.py benchmarks/results/gpu_throughput_h200_2026-11-27_sampled/bench.json docs/gpu_stages.png

One panel per mode; for each stage a bar of busy milliseconds per slice (naive grey, ours blue) and
the end-to-end milliseconds per slice last. Stages of ours overlap in time (four CUDA streams and
two host threads), so its bars add up to more than its end-to-end bar.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# (label, naive pipeline stages, ours stages): the host pipeline's "infer" is encoder + decoder together
ROWS = [("read", ("read",), ("read",)),
        ("to device / preprocess", ("tile",), ("h2d", "preprocess")),
        ("model (encoder + decoder)", ("infer",), ("encoder", "decoder", "model")),   # model: both, overlapped
        ("resize + aggregate", ("stitch", "aggregate"), ("aggregate",)),
        ("3D components", ("components",), ("components",)),
        ("to host + write labels.tif", ("write",), ("d2h", "write")),
        ("defect table (+ surface distance)", ("table",), ("table",)),
        ("defects.csv + preview", ("report",), ("report", "preview", "csv"))]   # ours: on threads, during the table (csv: formatted and written)
NAIVE, OURS = (150, 150, 150), (40, 110, 200)


def per_slice_ms(run: dict, stages) -> float:
    busy = run["stage_busy_s"]
    return 1000.0 * sum(busy.get(s, 0.0) for s in stages) / run["slices"]


def draw(res: dict, out: Path) -> None:
    modes = list(res["modes"])
    font = ImageFont.load_default()
    w, label_w, row_h, top = 900, 210, 22, 40
    panel_h = top + row_h * (len(ROWS) + 1) * 2 + 30
    img = Image.new("RGB", (w, panel_h * len(modes) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"{res['device']}  {res['date']}  volume {res['shape']}  {res['backbone']} random weights, "
                    f"batch {res['batch']}   ms per slice (busy; ours' stages overlap)", fill="black", font=font)
    for k, mode in enumerate(modes):
        r = res["modes"][mode]
        naive, ours = r["naive"], r["ours"]
        rows = [(label, per_slice_ms(naive, a), per_slice_ms(ours, b)) for label, a, b in ROWS]
        rows.append(("end to end", 1000.0 / naive["slices_per_s"], 1000.0 / ours["slices_per_s"]))
        scale = (w - label_w - 90) / max(max(a, b) for _, a, b in rows)
        y0 = 30 + k * panel_h
        d.text((10, y0), f"{mode} mode: naive {naive['slices_per_s']:.1f} slices/s (first {naive['slices']} slices, "
                         f"read from memory), "
                         f"ours {ours['slices_per_s']:.1f} slices/s ({ours['slices']} slices)", fill="black", font=font)
        y = y0 + top - 14
        for label, a, b in rows:
            d.text((10, y + 5), label, fill="black", font=font)
            for v, colour, dy in ((a, NAIVE, 0), (b, OURS, row_h - 4)):
                x1 = label_w + max(1, int(v * scale))
                d.rectangle([label_w, y + dy, x1, y + dy + row_h - 8], fill=colour)
                d.text((x1 + 4, y + dy + 2), f"{v:.2f}", fill="black", font=font)
            y += 2 * row_h
    d.rectangle([w - 200, 8, w - 190, 18], fill=NAIVE)
    d.text((w - 185, 8), "naive", fill="black", font=font)
    d.rectangle([w - 130, 8, w - 120, 18], fill=OURS)
    d.text((w - 115, 8), "ours", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
