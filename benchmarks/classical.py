"""Classical baseline segmenter (NumPy/SciPy only), the reference a trained model has to beat.

    part       = Otsu threshold of the whole volume's grey-value histogram, on a lightly smoothed
                 image, then holes filled slice by slice (scipy.ndimage.binary_fill_holes), so
                 closed pores inside the part count as part
    pores      = voxels of the part (minus a thin rim at its surface) darker than the LOCAL
                 mean - k_pore * LOCAL std
    inclusions = voxels of the part (minus the rim) brighter than local mean + k_incl * local std
    labels     = 0 air, 1 material, 2 pore, 3 inclusion (inclusion wins over pore)

All of it works on the image smoothed by a Gaussian (sigma `smooth`). The local mean and std
are computed over the part only, in a `window` x `window` box: uniform filters of image * mask,
image² * mask and mask, divided, so air next to the surface does not drag the statistics down.
With `robust` > 0 a second pass recomputes them without the pixels further than robust * std
from the first-pass mean (so dense pores do not inflate the std). The rim is `edge_margin`
pixels (binary erosion of the part). All of it is 2D per slice except the Otsu threshold,
which is one number for the volume.

Default parameters were chosen on the training volumes (train/pair_1, train/pair_2) only (see
tune_classical.py and benchmarks/RESULTS.md), never on the test sets.

    from classical import segment_classical
    labels = segment_classical(volume)                        # (Z, Y, X) -> uint8 (Z, Y, X)
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Chosen on the training volumes train/pair_1 and train/pair_2 only (tune_classical.py: 40 evenly
# spaced slices of each, 1944 settings, best mean of pore and inclusion IoU; the result is in
# results/tune_classical.json). A-priori values were k_pore 3, k_incl 4, no robust pass.
DEFAULTS = dict(k_pore=2.5, k_incl=4.0, smooth=0.7, window=61, edge_margin=4, robust=2.0)


def otsu_from_histogram(hist: np.ndarray, values: np.ndarray) -> float:
    """Otsu's threshold from a histogram: counts per bin and the grey value of each bin.
    Returns the value of the last 'dark' bin: dark = grey <= t."""
    hist = np.asarray(hist, np.float64)
    values = np.asarray(values, np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * values)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = w0 * w1 * (s0 / w0 - (s0[-1] - s0) / w1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    return float(values[int(np.argmax(between))])


def volume_threshold(volume: np.ndarray, bins: int = 1024, sample_slices: int = 32) -> float:
    """Otsu threshold of the volume's grey values.

    uint8/uint16 (and other integers spanning at most 65536 levels): histogram of ALL voxels,
    one bin per grey level, accumulated slice by slice, so the result is exact. Other dtypes:
    `bins` bins over `sample_slices` evenly spaced slices.
    """
    v = np.asarray(volume)
    if v.ndim == 2:
        v = v[None]
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    if v.dtype.kind in "ui" and hi - lo < 65536:
        hist = np.zeros(int(hi - lo) + 1, np.int64)
        for z in range(v.shape[0]):
            h = np.bincount((v[z].ravel().astype(np.int64) - int(lo)), minlength=len(hist))
            hist += h
        return otsu_from_histogram(hist, lo + np.arange(len(hist)))
    idx = np.unique(np.linspace(0, v.shape[0] - 1, min(sample_slices, v.shape[0])).round().astype(int))
    hist, edges = np.histogram(v[idx], bins=bins, range=(lo, hi))
    return otsu_from_histogram(hist, (edges[:-1] + edges[1:]) / 2)


def _smooth(img: np.ndarray, smooth: float) -> np.ndarray:
    s = img.astype(np.float32, copy=False)
    return ndi.gaussian_filter(s, smooth, mode="nearest") if smooth > 0 else s


def _masked_mean_std(s: np.ndarray, w: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and std of s over the pixels where w is 1 (uniform window)."""
    n = ndi.uniform_filter(w, window, mode="constant")
    sm = s * w
    mean = ndi.uniform_filter(sm, window, mode="constant")
    sq = ndi.uniform_filter(sm * s, window, mode="constant")
    n = np.where(n > 1e-6, n, np.inf)  # no part pixel in the window: mean 0, std 0 (never used)
    mean /= n
    sq /= n
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))


def slice_statistics(img: np.ndarray, threshold: float, smooth: float = DEFAULTS["smooth"],
                     window: int = DEFAULTS["window"], edge_margin: int = DEFAULTS["edge_margin"],
                     robust: float = DEFAULTS["robust"]):
    """(smoothed image, part mask, core mask, local mean, local std) of one slice.

    core = the part eroded by edge_margin pixels: where defects are looked for.
    robust > 0: a second pass recomputes mean and std without the pixels that the first pass
    puts further than robust * std from the mean, so dense defects do not inflate the std.
    """
    s = _smooth(img, smooth)
    part = ndi.binary_fill_holes(s > threshold)
    core = ndi.binary_erosion(part, iterations=edge_margin) if edge_margin > 0 else part
    w = part.astype(np.float32)
    mean, std = _masked_mean_std(s, w, window)
    if robust > 0:
        w = (part & (np.abs(s - mean) <= robust * std)).astype(np.float32)
        mean, std = _masked_mean_std(s, w, window)
    return s, part, core, mean, std


def labels_from_statistics(s, part, core, mean, std, k_pore: float, k_incl: float) -> np.ndarray:
    out = part.astype(np.uint8)
    out[core & (s < mean - k_pore * std)] = 2
    out[core & (s > mean + k_incl * std)] = 3
    return out


def segment_classical(volume: np.ndarray, k_pore: float = DEFAULTS["k_pore"], k_incl: float = DEFAULTS["k_incl"],
                      smooth: float = DEFAULTS["smooth"], window: int = DEFAULTS["window"],
                      edge_margin: int = DEFAULTS["edge_margin"], robust: float = DEFAULTS["robust"],
                      threshold: float | None = None) -> np.ndarray:
    """Label volume (Z, Y, X) uint8: 0 air, 1 material, 2 pore, 3 inclusion.

    threshold: the part/air grey value; default Otsu of this volume (pass the whole volume's
    threshold when segmenting a subset of its slices).
    """
    vol = np.asarray(volume)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {vol.shape}")
    t = volume_threshold(vol) if threshold is None else float(threshold)
    out = np.empty(vol.shape, np.uint8)
    for z in range(vol.shape[0]):
        out[z] = labels_from_statistics(*slice_statistics(vol[z], t, smooth, window, edge_margin, robust), k_pore, k_incl)
    return out


def describe(**params) -> dict:
    return {"name": "classical", "trained": False, "params": {**DEFAULTS, **params},
            "method": "Otsu part + per-slice hole filling; local mean ± k·std (over the part) for pores/inclusions"}
