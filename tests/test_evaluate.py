"""xctrt evaluate (hand-computed cases) and the domain-shift score (grows with noise and streaks)."""
import json

import numpy as np
import pytest
import tifffile

from xctrt.cli import main
from xctrt.evaluate import domain_shift, evaluate_volumes, object_detection
from xctrt.phantom import make_phantom


def _write(path, arr):
    tifffile.imwrite(path, arr, photometric="minisblack")
    return path


def test_objects_hand_computed():
    truth = np.ones((3, 8, 8), np.uint8)
    pred = np.ones((3, 8, 8), np.uint8)
    truth[0, 1, 1] = 2          # pore A: found (pred marks it)
    pred[0, 1, 1] = 2
    truth[2, 6, 6] = 2          # pore B: missed
    pred[1, 4, 4] = 2           # predicted pore that is not real
    truth[1, 2:4, 2:4] = 3      # one inclusion, found by a single overlapping voxel
    pred[1, 3, 3] = 3
    obj = object_detection(pred, truth)
    assert obj["pore"] == {"truth_objects": 2, "found": 1, "recall": 0.5, "pred_objects": 2, "real": 1,
                           "precision": 0.5}
    assert obj["inclusion"] == {"truth_objects": 1, "found": 1, "recall": 1.0, "pred_objects": 1, "real": 1,
                                "precision": 1.0}


def test_empty_classes_are_undefined_not_perfect():
    v = np.ones((2, 5, 5), np.uint8)
    obj = object_detection(v, v)
    assert obj["pore"]["recall"] is None and obj["pore"]["precision"] is None


def test_evaluate_cli_voxel_and_object_numbers(tmp_path):
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, :, 2:] = 1
    truth[0, 0, 3] = 2
    pred = truth.copy()
    pred[1, 0, 2] = 2   # one false-positive pore voxel, steals a material voxel
    p, t = _write(tmp_path / "p.tif", pred), _write(tmp_path / "t.tif", truth)
    res = evaluate_volumes(p, t)
    mat = res["classes"]["material"]
    assert (mat["tp"], mat["fp"], mat["fn"]) == (14, 0, 1) and mat["iou"] == pytest.approx(14 / 15)
    pore = res["classes"]["pore"]
    assert pore["iou"] == pytest.approx(0.5)
    assert res["classes"]["inclusion"]["iou"] is None
    # the two predicted pore voxels touch diagonally across slices: one object at 26-, two at 6-connectivity
    assert res["objects"]["pore"]["found"] == 1 and res["objects"]["pore"]["pred_objects"] == 1
    assert evaluate_volumes(p, t, connectivity=6)["objects"]["pore"]["pred_objects"] == 2
    assert main(["evaluate", str(p), str(t), "--json", str(tmp_path / "r.json")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["classes"]["pore"]["iou"] == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.int64])
def test_evaluate_takes_labels_stored_as_wider_integers(tmp_path, dtype):
    """Label exports from other tools are often int16/int32: the same numbers as uint8."""
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, (3, 8, 8)).astype(np.uint8)
    pred = np.where(rng.random(truth.shape) < 0.2, rng.integers(0, 4, truth.shape), truth).astype(np.uint8)
    ref = evaluate_volumes(_write(tmp_path / "p8.tif", pred), _write(tmp_path / "t8.tif", truth))
    got = evaluate_volumes(_write(tmp_path / "p.tif", pred.astype(dtype)),
                           _write(tmp_path / "t.tif", truth.astype(dtype)))
    assert got == ref


def test_evaluate_rejects_mismatch_and_non_labels(tmp_path, capsys):
    a = _write(tmp_path / "a.tif", np.zeros((2, 4, 4), np.uint8))
    b = _write(tmp_path / "b.tif", np.zeros((2, 4, 5), np.uint8))
    c = _write(tmp_path / "c.tif", np.full((2, 4, 4), 200, np.uint8))
    f = _write(tmp_path / "f.tif", np.ones((2, 4, 4), np.float32))   # grey values, even if they look like labels
    assert main(["evaluate", str(a), str(b)]) == 2
    assert main(["evaluate", str(c), str(a)]) == 2
    assert main(["evaluate", str(a), str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "differs" in err[0] and "not a label volume" in err[1]
    assert str(f) in err[2] and "not a label volume" in err[2]


def _phantom(seed, noise, shape=(8, 128, 128)):
    ph = make_phantom(shape, seed=seed, dtype=np.float32, noise=noise)
    return ph.render(0, shape[0])[0]


def test_domain_shift_grows_with_noise_and_streaks():
    ref = _phantom(0, 0.04)
    same_kind = domain_shift(ref, _phantom(1, 0.04))
    noisier = [domain_shift(ref, _phantom(1, s)) for s in (0.06, 0.10, 0.20)]
    assert same_kind < noisier[0] < noisier[1] < noisier[2]
    yy, xx = np.mgrid[:128, :128]
    streaks = _phantom(1, 0.04) + 0.08 * np.sin(2 * np.pi * (xx + 0.6 * yy) / 6.0).astype(np.float32)
    assert domain_shift(ref, streaks) > 2 * same_kind


def test_domain_shift_cli(tmp_path, capsys):
    a = _write(tmp_path / "a.tif", _phantom(0, 0.04))
    assert main(["domain-shift", str(a), str(a)]) == 0
    assert "domain shift" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (4, 31, 64)])
def test_domain_shift_refuses_slices_smaller_than_a_patch(tmp_path, capsys, shape):
    small = _write(tmp_path / "small.tif", np.ones(shape, np.float32))
    big = _write(tmp_path / "big.tif", _phantom(0, 0.04))
    assert main(["domain-shift", str(big), str(small)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(small) in err[0] and "smaller than the 32x32 patches" in err[0], err


def _finished_run(tmp_path, name="sim", hole=True, reported=None):
    """A simulate folder, a segment run of it whose labels enclose a 2x3x3 pocket of air in the part (the
    truth has material there), and its evaluation: what benchmarks/simulate_recovery.sh leaves."""
    from conftest import load_benchmark
    truth = np.zeros((4, 24, 24), np.uint8)
    truth[:, 4:20, 4:20] = 1
    truth[1, 6, 6] = 2
    pred = truth.copy()
    if hole:
        pred[1:3, 10:13, 10:13] = 0     # 18 voxels of enclosed air
    image = np.where(truth > 0, 3000, 500).astype(np.uint16)
    sim, run = tmp_path / name, tmp_path / f"seg-{name}"
    sim.mkdir()
    run.mkdir()
    _write(sim / "image.tif", image)
    _write(sim / "labels.tif", truth)
    (sim / "simulate.json").write_text(json.dumps({"config": {"views": 60, "beam_filter": ["Cu", 0.5]}}))
    _write(run / "labels.tif", pred)
    enclosed = 18 if hole else 0
    (run / "summary.json").write_text(json.dumps({"run": {"intensity_window": [500, 3000]}, "result": {
        "enclosed_air_voxels": enclosed if reported is None else reported}}))
    (tmp_path / f"eval-{name}.json").write_text(json.dumps(evaluate_volumes(run / "labels.tif", sim / "labels.tif")))
    return load_benchmark("enclosed_air"), run


def test_enclosed_air_scores_a_finished_run(tmp_path):
    enclosed_air, run = _finished_run(tmp_path)
    out = tmp_path / "enclosed.json"
    assert enclosed_air.main(["default", str(tmp_path), "--sets", "sim", "--z", "0", "4", "--pred", str(run),
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())["sets"]["sim"]
    assert r["enclosed_voxels"] == 18
    assert r["truth_of_enclosed"] == {"air": 0, "material": 18, "pore": 0, "inclusion": 0}
    assert r["iou"]["1"] < 1.0 and r["iou_enclosed_as_material"]["1"] == 1.0   # filled, the labels are the truth
    # part of the run: not checked against its summary, and still scored
    assert enclosed_air.main(["default", str(tmp_path), "--sets", "sim", "--z", "1", "3", "--pred", str(run),
                              "--json", str(out)]) == 0
    assert json.loads(out.read_text())["sets"]["sim"]["enclosed_voxels"] == 18


def test_enclosed_air_refuses_a_run_whose_summary_disagrees(tmp_path):
    enclosed_air, run = _finished_run(tmp_path, reported=5)
    with pytest.raises(AssertionError):
        enclosed_air.main(["default", str(tmp_path), "--sets", "sim", "--z", "0", "4", "--pred", str(run)])
    with pytest.raises(SystemExit):   # --pred is for one set
        enclosed_air.main(["default", str(tmp_path), "--sets", "sim", "other", "--pred", str(run)])


def test_simulate_recovery_figure_draws_truth_and_the_enclosed_air(tmp_path):
    from PIL import Image

    from conftest import load_benchmark
    from xctrt.preview import ENCLOSED, _blend
    _finished_run(tmp_path, "a")
    _finished_run(tmp_path, "b", hole=False)
    fig = load_benchmark("simulate_recovery_figure")
    out = tmp_path / "fig.png"
    assert fig.main([str(tmp_path), "a", "b", "-o", str(out)]) == 0
    px = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert px.shape[1] == 2 * fig.PANEL + 3 * 8
    magenta = _blend(np.full(3, 255.0, np.float32), ENCLOSED).astype(int)   # over the part's grey, at the window's top
    hit = np.all(np.abs(px - magenta) <= 1, axis=2)
    row = 8 + 34 + fig.PANEL   # the first row's panels end here
    assert hit[:row, fig.PANEL + 16:].any()                 # the run's pocket, in the first row's right panel
    assert not hit[:row, :fig.PANEL + 8].any()              # never in the truth panel
    assert not hit[row:row + 34 + fig.PANEL].any()          # nor in the second run, which encloses nothing


def test_simulate_recovery_script_end_to_end(tmp_path):
    """benchmarks/simulate_recovery.sh on one tiny volume: every step runs and leaves its output."""
    import subprocess
    import sys

    from conftest import REPO, xctrt_env
    pytest.importorskip("skimage")
    pytest.importorskip("scipy")
    env = {**xctrt_env(), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "simulate_recovery.sh"), str(tmp_path),
                        "t=--shape 2 48 48 --views 24 --pores-per-mm3 2000"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "wrote" in r.stdout.split("== t")[0]   # simulate and segment ran
    ev = json.loads((tmp_path / "eval-t.json").read_text())
    assert ev["slices"] == 2 and set(ev["classes"]) == {"material", "pore", "inclusion"}
    enc = json.loads((tmp_path / "enclosed-t.json").read_text())["sets"]["t"]
    assert enc["slices"] == [0, 2] and enc["enclosed_voxels"] >= 0
    assert "t" in json.loads((tmp_path / "classical.json").read_text())["sets"]
    assert (tmp_path / "simulate_segment.png").stat().st_size > 0
    # a second call finds every volume and run made, and only scores again
    r2 = subprocess.run(["bash", str(REPO / "benchmarks" / "simulate_recovery.sh"), str(tmp_path),
                         "t=--shape 2 48 48 --views 24 --pores-per-mm3 2000"],
                        env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "wrote" not in r2.stdout.split("== t")[0]
