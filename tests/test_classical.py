"""The classical baseline (benchmarks/classical.py) on a synthetic phantom and its Otsu helper."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from classical import otsu_from_histogram, segment_classical, volume_threshold  # noqa: E402

from xctrt.metrics import evaluate  # noqa: E402
from xctrt.phantom import make_phantom  # noqa: E402


def test_otsu_bimodal():
    v = np.array([10] * 50 + [11] * 10 + [200] * 40, np.uint8).reshape(1, 10, 10)
    assert volume_threshold(v) == 11.0  # dark = values <= 11, exact for integers
    assert volume_threshold(v.astype(np.float32)) < 200 and volume_threshold(v.astype(np.float32)) > 11
    assert otsu_from_histogram([5, 0, 0, 5], [0, 1, 2, 3]) in (0.0, 1.0, 2.0)


def test_segment_phantom():
    ph = make_phantom((8, 128, 128), seed=3, pores_per_mvox=600, inclusions_per_mvox=150, noise=0.03)
    img, truth = ph.render(0, 8)  # uint16; pores as dark as air, so hole filling must keep them in the part
    pred = segment_classical(img)
    assert pred.shape == truth.shape and pred.dtype == np.uint8
    assert set(np.unique(pred)) <= {0, 1, 2, 3}
    c = evaluate(pred, truth)["classes"]
    assert c["material"]["iou"] > 0.98
    assert c["pore"]["iou"] > 0.8
    assert c["inclusion"]["iou"] > 0.8
    # hole filling: no air inside the part away from its surface
    assert not ((pred == 0) & (truth >= 1))[:, 40:88, 40:88].any()
