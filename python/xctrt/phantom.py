"""Synthetic XCT-like test volumes: a cylindrical part with dark spherical pores and bright
inclusions, plus Gaussian noise. Rendered slab by slab, so a volume larger than RAM can be
written; the exact labels come with it. For demos, tests and throughput runs only; the
physics simulator with projections and reconstruction is `xctrt simulate` (simulate.py)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GREY = {"air": 0.08, "material": 0.45, "pore": 0.12, "inclusion": 0.85}  # fraction of the dtype range


@dataclass
class Phantom:
    shape: tuple[int, int, int]
    centre: tuple[float, float]
    radius: float
    spheres: np.ndarray        # (n, 5): z, y, x, r, label (2 pore, 3 inclusion)
    noise: float
    dtype: np.dtype
    seed: int

    def render(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and labels for slices z0..z1-1."""
        _, Y, X = self.shape
        yy, xx = np.ogrid[:Y, :X]
        inside = (yy - self.centre[0]) ** 2 + (xx - self.centre[1]) ** 2 <= self.radius ** 2
        labels = np.broadcast_to(inside.astype(np.uint8), (z1 - z0, Y, X)).copy()
        for z, y, x, r, lab in self.spheres:
            lo, hi = max(int(z - r), z0), min(int(z + r) + 1, z1)
            if lo >= hi:
                continue
            ya, yb = max(int(y - r), 0), min(int(y + r) + 1, Y)
            xa, xb = max(int(x - r), 0), min(int(x + r) + 1, X)
            zg, yg, xg = np.ogrid[lo:hi, ya:yb, xa:xb]
            ball = (zg - z) ** 2 + (yg - y) ** 2 + (xg - x) ** 2 <= r * r
            view = labels[lo - z0:hi - z0, ya:yb, xa:xb]
            view[ball & (view >= 1)] = int(lab)  # defects only inside the part
        grey = np.array([GREY["air"], GREY["material"], GREY["pore"], GREY["inclusion"]], np.float32)
        rng = np.random.default_rng([self.seed, z0])
        img = grey[labels] + rng.normal(0, self.noise, labels.shape).astype(np.float32)
        if self.dtype.kind == "f":
            return img.astype(self.dtype), labels
        top = np.iinfo(self.dtype).max
        return np.clip(img * top, 0, top).astype(self.dtype), labels


def make_phantom(shape=(64, 512, 512), seed: int = 0, dtype=np.uint16, pores_per_mvox: float = 40.0,
                 inclusions_per_mvox: float = 4.0, noise: float = 0.04) -> Phantom:
    Z, Y, X = shape
    rng = np.random.default_rng(seed)
    radius = 0.42 * min(Y, X)
    centre = ((Y - 1) / 2, (X - 1) / 2)
    part_mvox = np.pi * radius ** 2 * Z / 1e6
    spheres = []
    for lab, density, rmax in ((2, pores_per_mvox, 6.0), (3, inclusions_per_mvox, 3.0)):
        n = rng.poisson(density * part_mvox)
        ang = rng.uniform(0, 2 * np.pi, n)
        rad = radius * np.sqrt(rng.uniform(0, 0.95, n))
        r = rng.uniform(0.8, rmax, n)
        spheres.append(np.stack([rng.uniform(0, Z - 1, n), centre[0] + rad * np.sin(ang),
                                 centre[1] + rad * np.cos(ang), r, np.full(n, lab)], axis=1))
    return Phantom(tuple(shape), centre, radius, np.concatenate(spheres), noise, np.dtype(dtype), seed)


def write_phantom(path, shape=(64, 512, 512), seed: int = 0, dtype=np.uint16, voxel_size=(0.01, 0.01, 0.01),
                  labels_path=None, slab: int = 16, compression: str | None = "zlib") -> Phantom:
    """Write image (and optionally labels) as OME-TIFF, slab by slab; both are renamed into place
    only when both are complete."""
    from .errors import XctrtError
    from .io import TIFF_SUFFIXES, output_file, write_volume_tiff
    path = Path(path)
    labels_path = Path(labels_path) if labels_path is not None else None
    for p in (path, labels_path):   # TIFF bytes under .npy/.png would only fail later, when read back
        if p is not None and p.suffix.lower() not in TIFF_SUFFIXES:
            raise XctrtError(f"{p}: phantom writes TIFF volumes; give it a name ending in "
                             + ", ".join(TIFF_SUFFIXES))
    if labels_path is not None and labels_path.resolve() == path.resolve():
        raise XctrtError(f"{labels_path}: --labels names the image file too; the labels would replace the "
                         "image, give them another name")
    # every output is checked before any rendering: a bad --labels must not cost the image's time
    outputs = [(path, 0, dtype), *([(labels_path, 1, np.uint8)] if labels_path is not None else [])]
    staged = [output_file(p) for p, _, _ in outputs]
    ph = make_phantom(shape, seed, dtype)

    def pages(which):
        for z0 in range(0, shape[0], slab):
            yield from ph.render(z0, min(z0 + slab, shape[0]))[which]

    with contextlib.ExitStack() as stack:   # leaving with an error discards both; without, commits both
        for st, (p, which, dt) in zip(staged, outputs):
            stack.enter_context(st)
            with st.write(p.name) as tmp:
                write_volume_tiff(tmp, pages(which), shape, np.dtype(dt), voxel_size, compression)
    return ph
