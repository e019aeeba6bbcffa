"""2.5D U-Net baseline (training/unet25d.py): slice stacking, weighted Dice, augmentation parity with
data.py, a training step, resume, fine-tuning with replay, streamed prediction.

Tiny configs (8 base channels, depth 2, 32² crops, a few steps) on phantoms in tmp_path.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training import unet25d  # noqa: E402
from training.common import read_slices_json, segment_bounds  # noqa: E402
from training.data import Volume, _window, augment  # noqa: E402
from training.unet25d import (StackCropSampler, UNet25D, UNetTrainer, augment_stack, index_targets,  # noqa: E402
                              inverse_frequency_weights, parse_train_args, stack_indices, weighted_dice_loss)
from xctrt.phantom import write_phantom  # noqa: E402

torch.set_num_threads(2)
TINY = ["--crop", "32", "--base", "8", "--depth", "2", "--batch-size", "4", "--val-crops", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    out = []
    for name, seed in (("a", 0), ("b", 1)):
        d = root / name
        d.mkdir()
        write_phantom(d / "image.tif", (10, 48, 40), seed=seed, dtype=np.uint8, labels_path=d / "labels.tif")
        out.append(d)
    return out


def test_stack_indices_replicate_edges():
    assert stack_indices(0, 0, 9).tolist() == [0, 0, 0, 1, 2]
    assert stack_indices(1, 0, 9).tolist() == [0, 0, 1, 2, 3]
    assert stack_indices(5, 0, 9).tolist() == [3, 4, 5, 6, 7]
    assert stack_indices(9, 0, 9).tolist() == [7, 8, 9, 9, 9]
    lo, hi = segment_bounds([[0, 4], [4, 10]], 10)       # a staged volume: two blocks
    assert stack_indices(3, lo[3], hi[3]).tolist() == [1, 2, 3, 3, 3]
    assert stack_indices(4, lo[4], hi[4]).tolist() == [4, 4, 4, 5, 6]


def test_sampler_stacks_neighbours_in_order(tmp_path):
    z = 7
    image = np.broadcast_to((np.arange(z) * 10 + 5).astype(np.float32)[:, None, None], (z, 16, 16)).copy()
    labels = np.ones((z, 16, 16), np.uint8)
    v = Volume("ramp", image, labels, (0.0, 100.0), (0, z))
    v.seg_lo, v.seg_hi = segment_bounds([[0, 3], [3, 7]], z)
    v.targets = np.ones(z, bool)
    index_targets(v, [1, 2, 3], np.random.default_rng(0))
    s = StackCropSampler([v], 8, positive_fraction=0.0, augment=False)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(60):
        img, tgt = s.sample(rng)
        assert img.shape == (5, 8, 8) and tgt.shape == (4, 8, 8)
        centre = int(round(img[2, 0, 0] * 100 - 5)) // 10
        want = _window(image[stack_indices(centre, v.seg_lo[centre], v.seg_hi[centre]), :8, :8], 0.0, 100.0)
        assert np.allclose(img, want)
        seen.add(centre)
    assert seen == set(range(z))
    x, t = s.batch(rng, 3, [1, 2, 3])
    assert x.shape == (3, 5, 8, 8) and t.shape == (3, 4, 8, 8)


def test_slices_json_targets_limit_anchors(vols, tmp_path):
    d = tmp_path / "staged"
    d.mkdir()
    for f in ("image.tif", "labels.tif"):
        (d / f).write_bytes((vols[0] / f).read_bytes())
    (d / "slices.json").write_text(json.dumps({"segments": [[0, 5], [5, 10]], "targets": [2, 7]}))
    meta = read_slices_json(d, 10)
    assert meta["targets"] == [2, 7]
    v = unet25d.load_stack_volume(d)
    index_targets(v, [1, 2, 3], np.random.default_rng(0))
    assert v.anchor_slices.tolist() == [2, 7]
    assert all(set(p[:, 0].tolist()) <= {2, 7} for p in v.points.values())
    (d / "slices.json").write_text(json.dumps({"segments": [[0, 4], [5, 10]]}))
    with pytest.raises(ValueError, match="uncovered"):
        read_slices_json(d, 10)


def test_augment_stack_matches_data_augment():
    rng = np.random.default_rng(3)
    img = rng.random((16, 16)).astype(np.float32)
    tgt = (rng.random((2, 16, 16)) > 0.5).astype(np.float32)
    for seed in range(8):
        a_img, a_tgt = augment(img, tgt, np.random.default_rng(seed))
        b_img, b_tgt = augment_stack(img[None], tgt, np.random.default_rng(seed))
        assert np.array_equal(a_img, b_img[0]) and np.array_equal(a_tgt, b_tgt)
    # every channel gets the same geometry
    stack = np.stack([img, img, img])
    out, _ = augment_stack(stack, tgt, np.random.default_rng(5))
    assert np.abs(out[0] - out[1]).max() < 0.5 and np.corrcoef(out[0].ravel(), out[2].ravel())[0, 1] > 0.8


def test_weighted_dice_by_hand():
    # one image, 2 classes, 2 pixels: truth = [class 0, class 1]
    p = torch.tensor([[[[0.8, 0.4]], [[0.2, 0.6]]]])          # (1, 2, 1, 2)
    g = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    w = torch.tensor([0.25, 0.75])
    # class 0: inter 0.8, sum p+g = 1.2 + 1 = 2.2; class 1: inter 0.6, sum = 0.8 + 1 = 1.8
    want = 1 - 2 * (0.25 * 0.8 + 0.75 * 0.6) / (0.25 * 2.2 + 0.75 * 1.8)
    assert float(weighted_dice_loss(p, g, w, eps=0)) == pytest.approx(want, abs=1e-6)
    assert float(weighted_dice_loss(g, g, w)) == pytest.approx(0.0, abs=1e-6)
    assert float(weighted_dice_loss(1 - g, g, w)) == pytest.approx(1.0, abs=1e-6)


def test_inverse_frequency_weights():
    w = inverse_frequency_weights([50, 40, 9, 1], cap=None)
    inv = np.array([1 / 0.5, 1 / 0.4, 1 / 0.09, 1 / 0.01])
    assert np.allclose(w, inv / inv.sum()) and w.sum() == pytest.approx(1)
    w = inverse_frequency_weights([50, 40, 10, 0], cap=10)     # an absent class: floored, then capped
    assert w[3] / w[0] == pytest.approx(10) and w[2] / w[0] == pytest.approx(5)


def test_model_shapes():
    m = UNet25D(5, 4, base=8, depth=3)
    assert m(torch.rand(2, 5, 32, 24)).shape == (2, 4, 32, 24)


def test_training_step_lowers_loss_on_a_fixed_batch(vols, tmp_path):
    args = parse_train_args(["--data", str(vols[0]), *TINY, "--val-fraction", "0", "--lr", "3e-3",
                             "-o", str(tmp_path / "u.pt")])
    torch.manual_seed(0)
    tr = UNetTrainer(args, log=lambda s: None)
    assert tr.weights.sum() == pytest.approx(1) and tr.weights[3] >= tr.weights[2] > tr.weights[1]
    x, t = tr.draw_batch()
    before = [p.detach().clone() for p in tr.model.parameters()]
    losses = [tr.step_on(x, t) for _ in range(6)]
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    assert losses[-1] < losses[0] and tr.step == 6


def test_train_resume_finetune_replay_and_predict(vols, tmp_path):
    import tifffile

    ck = tmp_path / "u.pt"
    common = ["--data", str(vols[0]), "--val", str(vols[1]), *TINY, "--steps-per-epoch", "2", "-o", str(ck)]
    tr = unet25d.main(["train", *common, "--steps", "2"])
    assert tr.step == 2 and tr.best is not None and len(tr.history) == 1
    tr = unet25d.main(["train", *common, "--steps", "4", "--resume"])
    assert tr.step == 4 and [h["step"] for h in tr.history] == [2, 4]
    assert "dice" in tr.history[-1]["val"]

    ft = tmp_path / "ft.pt"
    tr2 = unet25d.main(["train", "--data", str(vols[1]), "--init", str(ck), "--replay", str(vols[0]),
                        "--replay-fraction", "0.5", "--val-fraction", "0", *TINY, "--steps", "2", "--workers", "1",
                        "--steps-per-epoch", "2", "-o", str(ft)])
    ck_d = torch.load(ck, map_location="cpu", weights_only=False)
    ft_d = torch.load(ft, map_location="cpu", weights_only=False)
    assert ft_d["init_from"] == str(ck.resolve()) and ft_d["class_weights"] == ck_d["class_weights"]
    assert ft_d["best"] is None and ft_d["config"]["replay_fraction"] == 0.5 and tr2.step == 2
    x, _ = tr2.draw_batch()
    assert x.shape == (4, 5, 32, 32)

    out, gt = tmp_path / "pred.tif", tmp_path / "gt.tif"
    unet25d.main(["predict", str(ck), str(vols[1]), str(out), "--device", "cpu"])
    lab = tifffile.imread(out)
    assert lab.dtype == np.uint8 and lab.shape == (10, 48, 40) and lab.max() <= 3
    res = unet25d.main(["predict", str(ft), str(vols[1] / "image.tif"), str(out), "--every", "3",
                        "--truth", str(vols[1] / "labels.tif"), "--truth-out", str(gt), "--device", "cpu"])
    assert res["targets"] == [0, 3, 6, 9] and res["weights"] == "last"
    assert tifffile.imread(out).shape == (4, 48, 40)
    assert np.array_equal(tifffile.imread(gt), tifffile.imread(vols[1] / "labels.tif")[[0, 3, 6, 9]])
    from xctrt.evaluate import evaluate_volumes
    assert "classes" in evaluate_volumes(out, gt)


def test_step_budget_cuts_the_run_and_stops(monkeypatch):
    import training.common as common

    now = [0.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    budget = common.StepBudget(0.5, log=lambda s: None)       # 30 s, one step per simulated second
    step, total = 0, 1000
    while step < total:
        now[0] += 1.0
        step += 1
        total = budget.after_step(step, total, 1000, epoch_end=step % 5 == 0)
        if budget.expired() and step < total:
            total = step
    assert 25 <= step <= 30
    assert common.StepBudget(None).after_step(5, 1000, 1000) == 1000
