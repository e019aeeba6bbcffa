"""xctrt.metrics on small hand-computed cases (numbers worked out by hand in the comments)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xctrt.metrics import (MetricsAccumulator, confusion_per_slice, evaluate, fmt_mean_std, iou_per_class,
                           layer_metrics)

# Three 2x4 slices.               class 1 (material)   class 2 (pore)      class 3 (inclusion)
TRUTH = np.array([[[0, 1, 1, 2],   # z0: TP3 FP1 FN1      TP1 FP1 FN0         TP0 FP0 FN1
                   [1, 1, 3, 0]],
                  [[0, 1, 1, 1],   # z1: TP4 FP0 FN2      TP0 FP1 FN0         TP0 FP1 FN0
                   [0, 1, 1, 1]],
                  [[1, 1, 1, 1],   # z2: TP8 FP0 FN0      absent in both      absent in both
                   [1, 1, 1, 1]]], np.uint8)
PRED = np.array([[[0, 1, 2, 2],
                  [1, 1, 1, 0]],
                 [[0, 1, 1, 1],
                  [0, 1, 3, 2]],
                 [[1, 1, 1, 1],
                  [1, 1, 1, 1]]], np.uint8)


def _stat(res, cls, key):
    s = res["classes"][cls][key]
    return s["mean"], s["std"], s["n"]


def test_counts_and_iou():
    res = evaluate(PRED, TRUTH)
    assert res["slices"] == 3
    m, p, i = (res["classes"][k] for k in ("material", "pore", "inclusion"))
    assert (m["tp"], m["fp"], m["fn"]) == (15, 1, 3)
    assert (p["tp"], p["fp"], p["fn"]) == (1, 2, 0)
    assert (i["tp"], i["fp"], i["fn"]) == (0, 1, 1)
    assert m["iou"] == pytest.approx(15 / 19)
    assert p["iou"] == pytest.approx(1 / 3)
    assert i["iou"] == 0.0
    assert (m["truth_voxels"], m["pred_voxels"]) == (18, 16)
    assert iou_per_class(PRED, TRUTH) == {1: pytest.approx(15 / 19), 2: pytest.approx(1 / 3), 3: 0.0}


def test_layer_metrics_material():
    # per slice P = 3/4, 1, 1; R = 3/4, 4/6, 1; F1 = 6/8, 8/10, 1
    res = evaluate(PRED, TRUTH)
    mean, std, n = _stat(res, "material", "precision")
    assert (mean, n) == (pytest.approx(11 / 12), 3)
    assert std == pytest.approx(math.sqrt(1 / 72))  # deviations -1/6, 1/12, 1/12
    mean, std, n = _stat(res, "material", "recall")
    assert (mean, n) == (pytest.approx(29 / 36), 3)
    assert std == pytest.approx(np.std([3 / 4, 2 / 3, 1]))
    mean, std, n = _stat(res, "material", "f1")
    assert (mean, n) == (pytest.approx(0.85), 3)
    assert std == pytest.approx(np.std([0.75, 0.8, 1.0]))


def test_layer_metrics_one_sided_and_absent_slices():
    res = evaluate(PRED, TRUTH)
    # pore: z0 P=1/2 R=1 F1=2/3; z1 absent in truth but predicted: P=0, R skipped, F1=0; z2 skipped
    assert _stat(res, "pore", "precision") == (pytest.approx(0.25), pytest.approx(0.25), 2)
    assert _stat(res, "pore", "recall") == (1.0, 0.0, 1)
    assert _stat(res, "pore", "f1") == (pytest.approx(1 / 3), pytest.approx(1 / 3), 2)
    # inclusion: z0 in truth, not predicted: R=0, P skipped, F1=0; z1 predicted, not in truth:
    # P=0, R skipped, F1=0; z2 skipped
    assert _stat(res, "inclusion", "precision") == (0.0, 0.0, 1)
    assert _stat(res, "inclusion", "recall") == (0.0, 0.0, 1)
    assert _stat(res, "inclusion", "f1") == (0.0, 0.0, 2)
    lm = layer_metrics(PRED, TRUTH)
    assert lm[2]["precision"] == {"mean": 0.25, "std": 0.25, "n": 2}


def test_class_absent_everywhere_is_none_not_one():
    t = np.ones((2, 3, 3), np.uint8)
    t[0, 1, 1] = 2
    res = evaluate(t, t)  # no inclusion anywhere, perfect otherwise
    inc = res["classes"]["inclusion"]
    assert inc["iou"] is None
    for key in ("precision", "recall", "f1"):
        assert inc[key] == {"mean": None, "std": None, "n": 0}
    # pore only in slice 0: one slice scored, the other skipped
    assert res["classes"]["pore"]["iou"] == 1.0
    assert res["classes"]["pore"]["f1"] == {"mean": 1.0, "std": 0.0, "n": 1}
    assert fmt_mean_std(inc["f1"]) == "–"
    json.dumps(res)  # None, not NaN: valid JSON


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (4, 16, 16), dtype=np.uint8)
    res = evaluate(t, t)
    for c in ("material", "pore", "inclusion"):
        r = res["classes"][c]
        assert r["iou"] == 1.0 and r["fp"] == 0 and r["fn"] == 0
        for key in ("precision", "recall", "f1"):
            assert r[key] == {"mean": 1.0, "std": 0.0, "n": 4}


def test_all_wrong_prediction():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 4, (3, 8, 8), dtype=np.uint8)
    p = (t + 1) % 4  # every voxel gets another class
    res = evaluate(p, t)
    for c in ("material", "pore", "inclusion"):
        r = res["classes"][c]
        assert r["iou"] == 0.0 and r["tp"] == 0
        for key in ("precision", "recall", "f1"):
            assert r[key] == {"mean": 0.0, "std": 0.0, "n": 3}


def test_streaming_equals_whole_volume():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 4, (10, 12, 9), dtype=np.uint8)
    p = np.where(rng.random(t.shape) < 0.3, rng.integers(0, 4, t.shape), t).astype(np.uint8)
    acc = MetricsAccumulator(classes=(0, 1, 2, 3))
    for z0 in (0, 3, 4, 8):
        z1 = {0: 3, 3: 4, 4: 8, 8: 10}[z0]
        acc.update(p[z0:z1], t[z0:z1])
    acc.update(p[0:0], t[0:0])  # an empty slab is harmless
    assert acc.slices == 10
    assert acc.result() == evaluate(p, t, classes=(0, 1, 2, 3))
    assert confusion_per_slice(p, t).sum() == t.size


def test_single_slice_and_input_checks():
    conf = confusion_per_slice(PRED[0], TRUTH[0])
    assert conf.shape == (1, 4, 4)
    assert conf[0, 1].tolist() == [0, 3, 1, 0]  # truth material -> pred (air, mat, pore, incl)
    with pytest.raises(ValueError, match="shape"):
        confusion_per_slice(PRED, TRUTH[:2])
    with pytest.raises(ValueError, match="outside"):
        confusion_per_slice(PRED + 4, TRUTH)
    with pytest.raises(ValueError, match="integers"):
        confusion_per_slice(PRED.astype(np.float32), TRUTH)
    with pytest.raises(ValueError, match="outside"):
        MetricsAccumulator(classes=(1, 4))
