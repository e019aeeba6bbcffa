"""preview.png: three orthogonal mid-planes, grey values with a colour overlay of the labels and a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .defects import runs_mask

ENCLOSED = 4   # not a class: air (label 0) the part encloses, drawn in its own colour so it can be looked at
COLOURS = {1: (70, 130, 180), 2: (255, 40, 40), 3: (255, 220, 0),   # material blue, pore red, inclusion yellow
           ENCLOSED: (230, 0, 230)}                                # enclosed air magenta
ALPHA = {1: 0.25, 2: 0.85, 3: 0.85, ENCLOSED: 0.85}
ENCLOSED_NAME = "air enclosed by the part"
PANEL = 384      # pixels of the longest side of any plane; the three share one scale (pixels per mm)
MIN_SIDE = 16    # a plane thinner than this (a volume of few slices) is stretched to it, and says so


def _panel(grey: np.ndarray, labels: np.ndarray, lo: float, hi: float, size: tuple[int, int]) -> Image.Image:
    """One plane drawn at its panel size: grey values and labels picked by nearest neighbour first, then
    blended. The blend works pixel by pixel, so this draws what blending the whole plane and then
    resizing would (same pixels), on a panel's ~150k pixels instead of a plane's millions."""
    def pick(a: np.ndarray, mode: str) -> np.ndarray:
        return np.asarray(Image.fromarray(a, mode).resize(size, Image.NEAREST))
    return _overlay(pick(np.ascontiguousarray(grey, np.float32), "F"), pick(np.ascontiguousarray(labels), "L"),
                    lo, hi)


def _overlay(grey: np.ndarray, labels: np.ndarray, lo: float, hi: float) -> Image.Image:
    g = np.clip((grey.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat((g * 255)[..., None], 3, axis=2)
    for cid, colour in COLOURS.items():
        m = labels == cid
        rgb[m] = _blend(rgb[m], cid)
    return Image.fromarray(rgb.astype(np.uint8))


def _blend(rgb, cid: int):
    return (1 - ALPHA[cid]) * rgb + ALPHA[cid] * np.array(COLOURS[cid], np.float32)


def mark_enclosed_air(planes: dict[str, tuple[np.ndarray, np.ndarray]], outside_runs: np.ndarray,
                      shape: tuple[int, int, int], value: int = ENCLOSED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The mid-planes (as write_preview takes them) with their air that is not in `outside_runs` (the
    labeller's (m, 4) z, y, x0, x1 x-runs of the air outside the part) relabelled `value`: ENCLOSED to
    draw it, or material where the run filled it (Segmenter fill_enclosed_air)."""
    Z, Y, X = shape
    z, y, x0, x1 = np.asarray(outside_runs).reshape(-1, 4).T   # column views (int32): no copies of millions of runs
    at = z == Z // 2
    on = y == Y // 2
    across = (x0 <= X // 2) & (x1 >= X // 2)
    yz = np.zeros((Z, Y), bool)
    yz[z[across], y[across]] = True
    outside = {"z": runs_mask(y[at], x0[at], x1[at], (Y, X)), "y": runs_mask(z[on], x0[on], x1[on], (Z, X)),
               "x": yz}
    out = {}
    for key, (grey, labels) in planes.items():
        labels = labels.copy()
        labels[(labels == 0) & ~outside[key]] = value
        out[key] = (grey, labels)
    return out


def plane_sizes(shapes, voxel_size) -> list[tuple[int, int, bool]]:
    """(width, height, stretched) in pixels of the XY, XZ and YZ planes of these array shapes: one scale
    in pixels per mm for all three (the longest side PANEL), each side at least MIN_SIDE."""
    dz, dy, dx = voxel_size
    spacing = [(dy, dx), (dz, dx), (dz, dy)]   # (rows, columns) of each plane
    scale = PANEL / max(max(r * sr, c * sc) for (r, c), (sr, sc) in zip(shapes, spacing))
    out = []
    for (r, c), (sr, sc) in zip(shapes, spacing):
        w, h = round(c * sc * scale), round(r * sr * scale)
        out.append((max(w, MIN_SIDE), max(h, MIN_SIDE), min(w, h) < MIN_SIDE))
    return out


def write_preview(path: Path, planes: dict[str, tuple[np.ndarray, np.ndarray]], window: tuple[float, float],
                  voxel_size, class_names: dict[int, str], title: str) -> None:
    """planes: name -> (grey 2D, labels 2D) for 'z' (YX), 'y' (ZX) and 'x' (ZY) mid-planes."""
    views = [planes["z"], planes["y"], planes["x"]]
    (Y, X), Z = views[0][0].shape, views[1][0].shape[0]
    names = tuple(f"{p}  {a} = {n // 2} of 0..{n - 1}" for p, a, n in (("XY", "z", Z), ("XZ", "y", Y), ("YZ", "x", X)))
    panels = []
    for name, (grey, labels), (w, h, stretched) in zip(names, views, plane_sizes(
            [g.shape for g, _ in views], voxel_size)):
        panels.append((name + ("  (stretched)" if stretched else ""), _panel(grey, labels, *window, (w, h))))
    pad, head, legend_h = 8, 18, 26
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [max(p.width, round(measure.textlength(name))) for name, p in panels]   # titles never overlap
    shown = [c for c in COLOURS if c != ENCLOSED or any((lab == ENCLOSED).any() for _, lab in views)]
    legend = [(cid, ENCLOSED_NAME if cid == ENCLOSED else class_names.get(cid, str(cid))) for cid in shown]
    legend_w = sum(20 + round(measure.textlength(label)) + 24 for _, label in legend) + pad
    width = max(sum(columns) + pad * (len(panels) + 1), round(measure.textlength(title)) + 2 * pad, legend_w)
    height = head + max(p.height for _, p in panels) + legend_h + 2 * pad + head
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(230, 230, 230))
    x = pad
    for (name, p), column in zip(panels, columns):
        draw.text((x, head + 2), name, fill=(200, 200, 200))
        canvas.paste(p, (x, 2 * head))
        x += column + pad
    y = height - legend_h
    x = pad
    for cid, label in legend:
        swatch = tuple(int(v) for v in _blend(np.full(3, 128, np.float32), cid))   # as drawn over mid grey
        draw.rectangle([x, y + 4, x + 14, y + 18], fill=swatch)
        draw.text((x + 20, y + 5), label, fill=(230, 230, 230))
        x += 20 + round(measure.textlength(label)) + 24
    # zlib level 1: 2-3x faster than PIL's default 6 and no larger on these pictures (the demo's preview
    # 168 vs 186 kB; a random network's 0.70 vs 1.06 MB: benchmarks/preview_cost.py)
    canvas.save(path, format="PNG", compress_level=1)
