"""Training data: labelled XCT volumes -> class-balanced, augmented 2D crops in the runtime's format.

A volume is a folder with image.tif (Z, Y, X grey values) and labels.tif (uint8: 0 air,
1 material, 2 pore, 3 inclusion). Inputs are windowed exactly as `xctrt segment` windows them
(0.5/99.5 percentiles of 16 evenly spaced slices, every 2nd pixel) so training and inference see
the same [0, 1] range. In "tile" mode a sample is an S×S crop (edge-padded when the slice is
smaller, as the runtime pads tiles); in "resize" mode it is a whole slice resized to S×S.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASS_IDS = {"material": 1, "pore": 2, "inclusion": 3}
POINTS_PER_SLICE = 64   # sampled anchor voxels kept per class per slice (bounds memory on big volumes)


def percentile_window(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """The runtime's default intensity window (xctrt Segmenter.intensity_window, percentile mode)."""
    zs = np.unique(np.linspace(0, image.shape[0] - 1, min(16, image.shape[0])).round().astype(int))
    lo, hi = (float(v) for v in np.percentile(image[zs][:, ::2, ::2], [low, high]))
    return lo, (hi if hi > lo else lo + 1.0)


@dataclass
class Volume:
    name: str
    image: np.ndarray                   # (Z, Y, X), raw grey values
    labels: np.ndarray                  # (Z, Y, X) uint8 class ids
    window: tuple[float, float]
    z_range: tuple[int, int]            # slices this split may use
    points: dict[int, np.ndarray] = field(default_factory=dict)   # class id -> (n, 3) int32 z, y, x

    def index_points(self, class_ids, rng: np.random.Generator) -> None:
        """A bounded random subset of voxel positions per class, for class-balanced cropping."""
        z0, z1 = self.z_range
        found: dict[int, list] = {c: [] for c in class_ids}
        for z in range(z0, z1):
            sl = self.labels[z]
            for c in class_ids:
                ys, xs = np.nonzero(sl == c)
                if len(ys):
                    k = rng.choice(len(ys), size=min(POINTS_PER_SLICE, len(ys)), replace=False)
                    found[c].append(np.stack([np.full(len(k), z), ys[k], xs[k]], 1))
        self.points = {c: (np.concatenate(v).astype(np.int32) if v else np.zeros((0, 3), np.int32))
                       for c, v in found.items()}


def load_volume(folder: str | Path, z_range: tuple[int, int] | None = None) -> Volume:
    import tifffile

    folder = Path(folder)
    image = tifffile.imread(folder / "image.tif")
    labels = tifffile.imread(folder / "labels.tif")
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"{folder}: image.tif {image.shape} and labels.tif {labels.shape} must be equal (Z, Y, X)")
    z = z_range or (0, image.shape[0])
    return Volume(folder.name, image, labels.astype(np.uint8, copy=False), percentile_window(image), z)


def split_volume(vol: Volume, val_fraction: float) -> tuple[Volume, Volume]:
    """Hold out the last slices of a volume for validation (contiguous, so crops don't leak)."""
    z0, z1 = vol.z_range
    cut = z1 - max(1, int(round((z1 - z0) * val_fraction)))
    train = Volume(vol.name, vol.image, vol.labels, vol.window, (z0, cut))
    val = Volume(vol.name + ":val", vol.image, vol.labels, vol.window, (cut, z1))
    return train, val


def _window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, half-pixel centres, no antialias: the same definition as xctrt's resize_bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = F.interpolate(t[None] if t.dim() == 3 else t[None, None], size=(size, size), mode="bilinear",
                      align_corners=False)
    return t[0].numpy() if a.ndim == 3 else t[0, 0].numpy()


def augment(img: np.ndarray, tgt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, 90° rotations (geometry, applied to both), then intensity jitter and noise (image only)."""
    if rng.random() < 0.5:
        img, tgt = img[:, ::-1], tgt[:, :, ::-1]
    if rng.random() < 0.5:
        img, tgt = img[::-1], tgt[:, ::-1]
    k = int(rng.integers(4))
    img, tgt = np.rot90(img, k), np.rot90(tgt, k, axes=(1, 2))
    # Contrast/brightness/gamma jitter stands in for scanner and window differences.
    contrast, bright, gamma = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08), np.exp(rng.uniform(-0.25, 0.25))
    img = np.clip((img - 0.5) * contrast + 0.5 + bright, 0, 1) ** gamma
    if rng.random() < 0.7:
        img = img + rng.normal(0, rng.uniform(0.0, 0.05), img.shape)
    return np.clip(img, 0, 1).astype(np.float32), np.ascontiguousarray(tgt, dtype=np.float32)


class CropSampler:
    """Draws (image (S, S), targets (K, S, S)) samples; target k = (labels == class_ids[k])."""

    def __init__(self, volumes: list[Volume], size: int, mode: str, class_ids: list[int],
                 positive_fraction: float = 0.5, augment: bool = True):
        if mode not in ("tile", "resize"):
            raise ValueError(f"input mode must be 'tile' or 'resize', not {mode!r}")
        self.volumes, self.size, self.mode = volumes, size, mode
        self.class_ids, self.positive_fraction, self.do_augment = list(class_ids), positive_fraction, augment

    def _anchor(self, rng: np.random.Generator, focus: int | None):
        """A (volume, z, y, x): on a voxel of the focus class when asked and available, else uniform."""
        if focus is not None:
            cands = [v for v in self.volumes if len(v.points.get(focus, ()))]
            if cands:
                v = cands[int(rng.integers(len(cands)))]
                z, y, x = v.points[focus][int(rng.integers(len(v.points[focus])))]
                return v, int(z), int(y), int(x)
        v = self.volumes[int(rng.integers(len(self.volumes)))]
        _, h, w = v.image.shape
        return v, int(rng.integers(*v.z_range)), int(rng.integers(h)), int(rng.integers(w))

    def sample(self, rng: np.random.Generator, focus: int | None = None):
        v, z, y, x = self._anchor(rng, focus)
        img, lab = v.image[z], v.labels[z]
        s = self.size
        if self.mode == "tile":
            h, w = img.shape
            # The anchor lands anywhere inside the crop, not always at its centre.
            y0 = int(np.clip(y - rng.integers(s), 0, max(0, h - s)))
            x0 = int(np.clip(x - rng.integers(s), 0, max(0, w - s)))
            img, lab = img[y0:y0 + s, x0:x0 + s], lab[y0:y0 + s, x0:x0 + s]
            ph, pw = s - img.shape[0], s - img.shape[1]
            if ph or pw:   # slice smaller than a tile: pad at the far edges, as the runtime does
                img = np.pad(img, ((0, ph), (0, pw)), mode="edge")
                lab = np.pad(lab, ((0, ph), (0, pw)), mode="edge")
            image = _window(img, *v.window)
            tgt = np.stack([lab == c for c in self.class_ids]).astype(np.float32)
        else:
            image = _resize(_window(img, *v.window), s)
            tgt = _resize(np.stack([lab == c for c in self.class_ids]).astype(np.float32), s)  # soft targets
        if self.do_augment:
            image, tgt = augment(image, tgt, rng)
        return image, tgt

    def batch(self, rng: np.random.Generator, n: int, focus_choices: list[int | None]):
        """n samples; each picks its focus uniformly from focus_choices, then is positive-anchored
        with probability positive_fraction."""
        imgs, tgts = [], []
        for _ in range(n):
            focus = focus_choices[int(rng.integers(len(focus_choices)))]
            if rng.random() >= self.positive_fraction:
                focus = None
            im, tg = self.sample(rng, focus)
            imgs.append(im)
            tgts.append(tg)
        return torch.from_numpy(np.stack(imgs)[:, None]), torch.from_numpy(np.stack(tgts))
