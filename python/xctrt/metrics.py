"""Segmentation accuracy: per-class IoU over a volume and the paper's layer-by-layer metrics.

NumPy only. Everything is computed from one confusion matrix per slice, so a volume can be
evaluated slab by slab (:class:`MetricsAccumulator`) in bounded memory, and the whole-volume
and per-slice numbers come from the same counts.

Definitions (``c`` a class id, counts are voxels; ``pred == c`` and ``truth == c``):

IoU (per class, over the whole volume)
    ``IoU_c = TP / (TP + FP + FN)`` with TP, FP, FN summed over every evaluated voxel.
    When the class is absent from both prediction and truth (TP + FP + FN == 0) the IoU is
    undefined and reported as ``None`` (never silently as 1.0).

Layer-by-layer precision, recall, F1 (paper, section 4.3)
    For every slice z: ``P_z = TP_z / (TP_z + FP_z)``, ``R_z = TP_z / (TP_z + FN_z)``,
    ``F1_z = 2 P_z R_z / (P_z + R_z)``, with voxel counts of that slice. The paper then reports
    the mean and the standard deviation of each over the slices. The paper does not say what it
    does when a ratio is 0/0; here:

    - class absent in truth and prediction of the slice (TP = FP = FN = 0): the slice is skipped
      for P, R and F1 (it contributes to none of the means);
    - absent in truth but predicted (TP = FN = 0, FP > 0): P = 0, F1 = 0, R undefined -> skipped
      for R;
    - present in truth but not predicted (TP = FP = 0, FN > 0): R = 0, F1 = 0, P undefined ->
      skipped for P;
    - otherwise all three are defined. F1 is computed as ``2 TP / (2 TP + FP + FN)``, which equals
      the harmonic mean whenever P and R are both defined and is 0 in the two one-sided cases.

    Each statistic reports the number of slices it averages (``n``); mean and std are ``None``
    when ``n == 0``. The std is the population standard deviation over those slices (ddof=0).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

CLASS_NAMES = {0: "air", 1: "material", 2: "pore", 3: "inclusion"}
DEFAULT_CLASSES = (1, 2, 3)


def confusion_per_slice(pred: np.ndarray, truth: np.ndarray, n_labels: int = 4) -> np.ndarray:
    """Confusion matrices of a stack of slices: int64 (Z, n_labels, n_labels), ``[z, truth, pred]``.

    A single 2D slice is treated as a stack of one. Labels must be integers in [0, n_labels).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if pred.ndim == 2:
        pred, truth = pred[None], truth[None]
    if pred.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) stack or a (Y, X) slice, got {pred.ndim} dimensions")
    for name, a in (("prediction", pred), ("truth", truth)):
        if a.dtype.kind not in "ui" and a.dtype != bool:
            raise ValueError(f"{name} labels must be integers, got {a.dtype}")
    z = pred.shape[0]
    k = int(n_labels)
    out = np.empty((z, k, k), np.int64)
    if pred.size == 0:
        out[:] = 0
        return out
    for name, a in (("prediction", pred), ("truth", truth)):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{name} has label values outside [0, {k}): min {lo}, max {hi}")
    # one bincount per slice keeps the index array at one slice (bounded memory for big slabs)
    for i in range(z):
        idx = truth[i].astype(np.intp, copy=False).ravel() * k + pred[i].astype(np.intp, copy=False).ravel()
        out[i] = np.bincount(idx, minlength=k * k).reshape(k, k)
    return out


def _class_counts(conf: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice TP, FP, FN of class c from (Z, K, K) confusion matrices."""
    tp = conf[:, c, c]
    fp = conf[:, :, c].sum(axis=1) - tp
    fn = conf[:, c, :].sum(axis=1) - tp
    return tp, fp, fn


def iou_from_counts(tp: int, fp: int, fn: int) -> float | None:
    """TP / (TP + FP + FN); None when the class is absent from prediction and truth."""
    d = int(tp) + int(fp) + int(fn)
    return None if d == 0 else int(tp) / d


def slice_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice precision, recall, F1 as float arrays with NaN where undefined (see module doc)."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        r = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {"precision": p, "recall": r, "f1": f}


def _mean_std(values: np.ndarray) -> dict:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def metrics_from_confusion(conf: np.ndarray, classes: Iterable[int] = DEFAULT_CLASSES,
                           names: Mapping[int, str] = CLASS_NAMES) -> dict:
    """All metrics from per-slice confusion matrices (Z, K, K).

    Returns ``{"slices": Z, "classes": {name: {...}}}`` where each class has ``id``, volume
    ``tp``/``fp``/``fn``/``truth_voxels``/``pred_voxels``, ``iou`` (float or None) and
    ``precision``/``recall``/``f1`` as ``{"mean", "std", "n"}`` over slices.
    """
    conf = np.asarray(conf)
    out = {"slices": int(conf.shape[0]), "classes": {}}
    for c in classes:
        c = int(c)
        tp, fp, fn = _class_counts(conf, c)
        TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
        scores = slice_scores(tp, fp, fn)
        out["classes"][names.get(c, str(c))] = {
            "id": c, "tp": TP, "fp": FP, "fn": FN, "truth_voxels": TP + FN, "pred_voxels": TP + FP,
            "iou": iou_from_counts(TP, FP, FN),
            **{k: _mean_std(v) for k, v in scores.items()},
        }
    return out


def evaluate(pred: np.ndarray, truth: np.ndarray, classes: Iterable[int] = DEFAULT_CLASSES,
             n_labels: int = 4, names: Mapping[int, str] = CLASS_NAMES) -> dict:
    """IoU and layer-by-layer P/R/F1 of a label volume (Z, Y, X) against the truth."""
    return metrics_from_confusion(confusion_per_slice(pred, truth, n_labels), classes, names)


def iou_per_class(pred: np.ndarray, truth: np.ndarray, classes: Iterable[int] = DEFAULT_CLASSES,
                  n_labels: int = 4) -> dict[int, float | None]:
    """{class id: IoU over the volume, or None when absent from both}."""
    conf = confusion_per_slice(pred, truth, n_labels).sum(axis=0)[None]
    res = {}
    for c in classes:
        tp, fp, fn = (int(a[0]) for a in _class_counts(conf, int(c)))
        res[int(c)] = iou_from_counts(tp, fp, fn)
    return res


def layer_metrics(pred: np.ndarray, truth: np.ndarray, classes: Iterable[int] = DEFAULT_CLASSES,
                  n_labels: int = 4) -> dict[int, dict[str, dict]]:
    """{class id: {"precision"|"recall"|"f1": {"mean", "std", "n"}}} over the slices (axis 0)."""
    conf = confusion_per_slice(pred, truth, n_labels)
    res = {}
    for c in classes:
        scores = slice_scores(*_class_counts(conf, int(c)))
        res[int(c)] = {k: _mean_std(v) for k, v in scores.items()}
    return res


class MetricsAccumulator:
    """Streaming evaluation: feed prediction/truth slabs in any order of slabs, read the metrics.

    >>> acc = MetricsAccumulator()
    >>> for z0 in range(0, Z, 8):
    ...     acc.update(pred[z0:z0 + 8], truth[z0:z0 + 8])
    >>> acc.result()["classes"]["pore"]["iou"]

    Memory is one K x K matrix of counts per slice seen. Slices are independent units: the same
    volume fed as one block or as slabs gives identical results.
    """

    def __init__(self, classes: Iterable[int] = DEFAULT_CLASSES, n_labels: int = 4,
                 names: Mapping[int, str] = CLASS_NAMES):
        self.classes = tuple(int(c) for c in classes)
        self.n_labels = int(n_labels)
        self.names = dict(names)
        for c in self.classes:
            if not 0 <= c < self.n_labels:
                raise ValueError(f"class {c} is outside [0, {self.n_labels})")
        self._blocks: list[np.ndarray] = []

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        self._blocks.append(confusion_per_slice(pred, truth, self.n_labels))

    @property
    def confusion(self) -> np.ndarray:
        """Per-slice confusion matrices seen so far, (Z, K, K) int64, ``[z, truth, pred]``."""
        if not self._blocks:
            return np.zeros((0, self.n_labels, self.n_labels), np.int64)
        if len(self._blocks) > 1:
            self._blocks = [np.concatenate(self._blocks)]
        return self._blocks[0]

    @property
    def slices(self) -> int:
        return sum(len(b) for b in self._blocks)

    def result(self) -> dict:
        return metrics_from_confusion(self.confusion, self.classes, self.names)


def fmt_mean_std(stat: Mapping | None, digits: int = 3) -> str:
    """'0.912 ± 0.031' or '–' when undefined."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def fmt_value(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
