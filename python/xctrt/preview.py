"""preview.png: three orthogonal mid-planes, grey values with a colour overlay of the labels and a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {1: (70, 130, 180), 2: (255, 40, 40), 3: (255, 220, 0)}  # material blue, pore red, inclusion yellow
ALPHA = {1: 0.25, 2: 0.85, 3: 0.85}
PANEL = 384


def _panel(grey: np.ndarray, labels: np.ndarray, lo: float, hi: float, aspect: float) -> Image.Image:
    g = np.clip((grey.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat((g * 255)[..., None], 3, axis=2)
    for cid, colour in COLOURS.items():
        m = labels == cid
        rgb[m] = (1 - ALPHA[cid]) * rgb[m] + ALPHA[cid] * np.array(colour, np.float32)
    img = Image.fromarray(rgb.astype(np.uint8))
    h, w = labels.shape
    h_phys = h * aspect  # rows may be slices (z) with a different spacing than x/y
    scale = PANEL / max(h_phys, w)
    return img.resize((max(1, round(w * scale)), max(1, round(h_phys * scale))), Image.NEAREST)


def write_preview(path: Path, planes: dict[str, tuple[np.ndarray, np.ndarray]], window: tuple[float, float],
                  voxel_size, class_names: dict[int, str], title: str) -> None:
    """planes: name -> (grey 2D, labels 2D) for 'z' (YX), 'y' (ZX) and 'x' (ZY) mid-planes."""
    dz, dy, dx = voxel_size
    panels = [("XY  z = mid", _panel(*planes["z"], *window, dy / dx)),
              ("XZ  y = mid", _panel(*planes["y"], *window, dz / dx)),
              ("YZ  x = mid", _panel(*planes["x"], *window, dz / dy))]
    pad, head, legend_h = 8, 18, 26
    width = sum(p.width for _, p in panels) + pad * (len(panels) + 1)
    height = head + max(p.height for _, p in panels) + legend_h + 2 * pad + head
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(230, 230, 230))
    x = pad
    for name, p in panels:
        draw.text((x, head + 2), name, fill=(200, 200, 200))
        canvas.paste(p, (x, 2 * head))
        x += p.width + pad
    y = height - legend_h
    x = pad
    for cid, colour in COLOURS.items():
        draw.rectangle([x, y + 4, x + 14, y + 18], fill=colour)
        label = class_names.get(cid, str(cid))
        draw.text((x + 20, y + 5), label, fill=(230, 230, 230))
        x += 30 + 7 * len(label) + 20
    canvas.save(path, format="PNG")
