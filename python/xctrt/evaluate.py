"""`xctrt evaluate PRED GT` and `xctrt domain-shift A B`.

Voxel metrics (IoU, the paper's layer-by-layer P/R/F1) come from metrics.py, streamed slab by
slab. Object metrics: 3D connected components (the C++ labeller) of each defect class in both
volumes; a ground-truth defect is *found* when any of its voxels is predicted as that class, a
predicted defect is *real* when any of its voxels is that class in the truth.

Domain shift. The paper used FID, whose Inception weights cannot be had here. We keep FID's
Fréchet distance between Gaussians fitted to patch features, but the features are a fixed,
weight-free filter bank on the intensities the model actually sees (each volume windowed to its
own 0.5-99.5 percentiles, as the default models do): per 32x32 patch, mean and spread of the
windowed grey values, of the residual after Gaussian smoothing at 3 scales (noise and fine
texture), of the gradient magnitude at 3 scales (edges, streaks), and of the Laplacian (blobs).
Features are standardised with the pooled statistics of both volumes, so the score has no unit
and is comparable between pairs. tests/test_evaluate.py checks that it grows with added noise
and with streak artefacts, and stays small between two scans of the same kind.
"""
from __future__ import annotations

import numpy as np

from . import _core
from .errors import XctrtError
from .io import VolumeSource, open_volume
from .metrics import CLASS_NAMES, MetricsAccumulator

DEFECTS = (2, 3)


def _open(v) -> VolumeSource:
    return v if isinstance(v, VolumeSource) else open_volume(v)


def object_detection(pred: np.ndarray, truth: np.ndarray, classes=DEFECTS, connectivity: int = 26) -> dict:
    """Per defect class: ground-truth objects found (recall) and predicted objects that are real (precision)."""
    out = {}
    for c in classes:
        gt_ids = _core.label_volume(np.ascontiguousarray(truth, np.uint8), [int(c)], connectivity)
        pr_ids = _core.label_volume(np.ascontiguousarray(pred, np.uint8), [int(c)], connectivity)
        n_gt, n_pr = int(gt_ids.max()), int(pr_ids.max())
        found = np.unique(gt_ids[(gt_ids > 0) & (pred == c)]).size
        real = np.unique(pr_ids[(pr_ids > 0) & (truth == c)]).size
        out[CLASS_NAMES.get(int(c), str(c))] = {
            "truth_objects": n_gt, "found": int(found), "recall": found / n_gt if n_gt else None,
            "pred_objects": n_pr, "real": int(real), "precision": real / n_pr if n_pr else None}
    return out


def evaluate_volumes(pred, truth, connectivity: int = 26, slab: int = 16) -> dict:
    """Voxel and object metrics of a predicted label volume against the truth (paths or sources)."""
    p, t = _open(pred), _open(truth)
    try:
        if p.shape != t.shape:
            raise XctrtError(f"{p.path}: shape {p.shape} differs from the truth {t.path} {t.shape}")
        acc = MetricsAccumulator()
        pv = np.empty(p.shape, np.uint8)
        tv = np.empty(t.shape, np.uint8)
        for z0 in range(0, p.shape[0], slab):
            z1 = min(z0 + slab, p.shape[0])
            a, b = p.read(z0, z1), t.read(z0, z1)
            for src, v, arr in ((p, a, pv), (t, b, tv)):
                name = src.path   # judged by the file's type: int16/int32/int64 labels reach here as float32
                if src.file_dtype.kind not in "iu" or v.max(initial=0) > 3 or v.min(initial=0) < 0:
                    raise XctrtError(f"{name}: not a label volume (values must be 0 air, 1 material, 2 pore, "
                                     "3 inclusion)")
                arr[z0:z1] = v
            acc.update(a.astype(np.uint8), b.astype(np.uint8))
        res = acc.result()
        res["objects"] = object_detection(pv, tv, connectivity=connectivity)
        res["connectivity"] = connectivity
        return res
    finally:
        p.close()
        t.close()


# ------------------------------------------------------------------------ domain shift

def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    pad = np.pad(img, r, mode="reflect")
    rows = np.lib.stride_tricks.sliding_window_view(pad, len(k), axis=1) @ k
    return np.lib.stride_tricks.sliding_window_view(rows, len(k), axis=0) @ k


def _slice_features(w: np.ndarray, patch: int, rng: np.random.Generator, n: int) -> np.ndarray:
    maps = [w]
    for s in (1.0, 2.0, 4.0):
        g = _smooth(w, s)
        gy, gx = np.gradient(g)
        maps += [w - g, np.hypot(gy, gx)]
    g1 = _smooth(w, 1.0)
    maps.append(np.abs(g1[2:, 1:-1] + g1[:-2, 1:-1] + g1[1:-1, 2:] + g1[1:-1, :-2] - 4 * g1[1:-1, 1:-1]))
    h, wd = maps[-1].shape
    ys = rng.integers(0, max(1, h - patch), n)
    xs = rng.integers(0, max(1, wd - patch), n)
    feats = np.empty((n, 2 * len(maps)), np.float64)
    for i, (y, x) in enumerate(zip(ys, xs)):
        for j, m in enumerate(maps):
            p = m[y:y + patch, x:x + patch]
            feats[i, 2 * j], feats[i, 2 * j + 1] = p.mean(), p.std()
    return feats


def domain_features(volume, slices: int = 12, patches_per_slice: int = 64, patch: int = 32, seed: int = 0
                    ) -> np.ndarray:
    """Patch features (n, 16) of a grey-value volume (path, source or array)."""
    from .io import ArraySource
    src = ArraySource(volume) if isinstance(volume, np.ndarray) else _open(volume)
    try:
        if min(src.shape[1:]) < patch:   # the filters and patches need whole 32x32 windows of a slice
            raise XctrtError(f"{src.path}: slices of {src.shape[1]}x{src.shape[2]} are smaller than the "
                             f"{patch}x{patch} patches the domain shift compares")
        sample = src.sample_slices(slices).astype(np.float32)
    finally:
        src.close()
    lo, hi = np.percentile(sample[:, ::2, ::2], [0.5, 99.5])
    w = np.clip((sample - lo) / max(float(hi - lo), 1e-12), 0, 1)
    rng = np.random.default_rng(seed)
    return np.concatenate([_slice_features(s, patch, rng, patches_per_slice) for s in w])


def frechet_distance(fa: np.ndarray, fb: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, on pooled-standardised features."""
    both = np.concatenate([fa, fb])
    scale = both.std(axis=0)
    scale[scale == 0] = 1.0
    a, b = (fa - both.mean(axis=0)) / scale, (fb - both.mean(axis=0)) / scale
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr sqrt(ca cb) via the symmetric form sqrt(ca)^T cb sqrt(ca): eigenvalues are real and >= 0.
    ea, va = np.linalg.eigh(ca)
    sa = (va * np.sqrt(np.clip(ea, 0, None))) @ va.T
    cross = np.linalg.eigvalsh(sa @ cb @ sa)
    return float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def domain_shift(a, b, seed: int = 0) -> float:
    return frechet_distance(domain_features(a, seed=seed), domain_features(b, seed=seed + 1))


# ------------------------------------------------------------------------ report

def format_report(res: dict) -> str:
    from .metrics import fmt_mean_std, fmt_value
    lines = [f"{'class':<10}{'IoU':>7}  {'precision (slices)':>20}  {'recall (slices)':>20}  {'F1 (slices)':>20}"]
    for name, c in res["classes"].items():
        lines.append(f"{name:<10}{fmt_value(c['iou']):>7}  {fmt_mean_std(c['precision']):>20}  "
                     f"{fmt_mean_std(c['recall']):>20}  {fmt_mean_std(c['f1']):>20}")
    lines.append(f"objects ({res['connectivity']}-connected): "
                 + "; ".join(f"{n} found {o['found']}/{o['truth_objects']} (recall {fmt_value(o['recall'])}), "
                             f"real {o['real']}/{o['pred_objects']} (precision {fmt_value(o['precision'])})"
                             for n, o in res["objects"].items()))
    return "\n".join(lines)
