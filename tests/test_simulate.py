"""xctrt simulate: labelled AM phantoms, polychromatic projection, noise and FBP (small shapes, fast)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("xraydb")

from xctrt.errors import XctrtError  # noqa: E402
from xctrt.io import open_volume  # noqa: E402
from xctrt.simulate import (INCLUSION, MATERIAL, MATERIALS, PARTS, PORE, FanBeam, ParallelBeam,  # noqa: E402
                            SimConfig, StlPart, build, make_am_phantom, mu_per_mm, read_stl, simulate,
                            tube_spectrum)


def scanner_for(views=60, dose=0.0, geometry="parallel", mono=None, voxel=0.1, **kw):
    cfg = SimConfig(shape=(4, 64, 64), views=views, dose=dose, geometry=geometry, mono_kev=mono, voxel_size=voxel,
                    **kw)
    return build(cfg)


def uniform_cylinder(geometry="parallel", mono=None, views=90, dose=0.0, voxel=0.1):
    ph, sc = scanner_for(views, dose, geometry, mono, voxel, pores_per_mm3=0, inclusions_per_mm3=0)
    lab = ph.render(0, 1)[0]
    return lab, sc.scan(lab), sc


def ring_means(img, lab):
    c = (np.array(lab.shape) - 1) / 2
    yy, xx = np.indices(lab.shape)
    r = np.hypot(yy - c[0], xx - c[1])
    rmax = r[lab == MATERIAL].max()
    return img[r < 0.3 * rmax].mean(), img[(r > 0.8 * rmax) & (r < rmax - 1.5)].mean()


# ----------------------------------------------------------------------------- phantom


@pytest.mark.parametrize("part", PARTS)
def test_labels_convention_and_defects_only_inside_the_part(part):
    ph = make_am_phantom((12, 64, 64), part, voxel_size=0.05, seed=3, pores_per_mm3=40, pore_size=0.2,
                         inclusions_per_mm3=10, inclusion_size=0.15)
    lab = ph.render(0, 12)
    assert lab.dtype == np.uint8 and lab.shape == (12, 64, 64)
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    zz, yy, xx = np.ogrid[:12, :64, :64]
    solid = np.broadcast_to(ph.inside(zz, yy, xx), lab.shape)
    assert (lab[~solid] == 0).all() and (lab[solid] >= 1).all()
    assert (lab == PORE).any() and (lab == INCLUSION).any()
    assert lab[:, 0, 0].max() == 0  # corners of the field of view are air
    # rendering in slabs gives the same labels as in one go
    assert np.array_equal(np.concatenate([ph.render(z, min(z + 5, 12)) for z in range(0, 12, 5)]), lab)


def test_part_geometry():
    def solid(part, z=10, Z=20):
        ph = make_am_phantom((Z, 64, 64), part, pores_per_mm3=0, inclusions_per_mm3=0)
        return ph.render(z, z + 1)[0] == MATERIAL

    cyl = solid("cylinder")
    assert cyl[32, 32] and not cyl[32, 2] and abs(cyl.sum() - np.pi * (0.8 * 32) ** 2) < 60
    block = solid("block")
    rows, cols = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
    assert block[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and len(cols) > len(rows)
    lattice = solid("lattice")
    assert 0.2 < lattice.sum() / cyl.sum() < 0.8  # struts and holes
    low, high = solid("overhang", 2, 40), solid("overhang", 35, 40)
    assert low.sum() < high.sum() and (high | low).sum() == high.sum()  # grows upward: an overhang


def test_defect_density_scales_with_pores_per_mm3():
    few = make_am_phantom((16, 64, 64), voxel_size=0.05, pores_per_mm3=10, inclusions_per_mm3=0)
    many = make_am_phantom((16, 64, 64), voxel_size=0.05, pores_per_mm3=100, inclusions_per_mm3=0)
    n_few, n_many = sum(few.counts.values()), sum(many.counts.values())
    part_mm3 = np.pi * (0.8 * 32 * 0.05) ** 2 * 16 * 0.05
    assert abs(n_many - 100 * part_mm3) < 4 * np.sqrt(100 * part_mm3)
    assert n_many > 4 * n_few
    only_lof = make_am_phantom((16, 64, 64), voxel_size=0.05, pores_per_mm3=50, pore_mix=(0, 0, 1))
    assert only_lof.counts["lack_of_fusion"] > 0 and only_lof.counts["sphere"] == only_lof.counts["ellipsoid"] == 0


def test_same_seed_same_volume_other_seed_differs():
    a = scanner_for(dose=1e3, seed=5)
    b = scanner_for(dose=1e3, seed=5)
    c = scanner_for(dose=1e3, seed=6)
    la, lb, lc = (p.render(0, 4) for p, _ in (a, b, c))
    assert np.array_equal(la, lb) and not np.array_equal(la, lc)
    ra, rb, rc = a[1].scan(la[1], 1), b[1].scan(lb[1], 1), c[1].scan(la[1], 1)
    assert np.array_equal(ra, rb)
    assert not np.array_equal(ra, rc)  # same labels, other noise


# ----------------------------------------------------------------------------- physics


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_more_views_smaller_error_against_the_ideal_image(geometry):
    errors = []
    for views in (8, 16, 32, 96):  # 64-pixel slices: about 100 views sample them fully
        ph, sc = scanner_for(views, 0.0, geometry, mono=80, pores_per_mm3=20, pore_size=0.4,
                             inclusions_per_mm3=0)
        lab = ph.render(1, 2)[0]
        errors.append(np.sqrt(np.mean((sc.scan(lab) - sc.ideal(lab)) ** 2)))
    assert errors[0] > 1.3 * errors[1] > 1.3 * 1.3 * errors[2], errors  # streaks shrink
    assert errors[2] > errors[3], errors


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_monochromatic_reconstructs_the_tabulated_mu(geometry):
    lab, rec, sc = uniform_cylinder(geometry, mono=80)
    centre, rim = ring_means(rec, lab)
    mu = sc.mu_at(80)["material"]
    assert abs(centre - mu) < 0.03 * mu and abs(rim - mu) < 0.03 * mu  # flat: no cupping


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_polychromatic_beam_hardening_cups(geometry):
    lab, rec, _ = uniform_cylinder(geometry)
    centre, rim = ring_means(rec, lab)
    assert centre < 0.9 * rim, (centre, rim)


def test_beam_filter_hardens_the_spectrum_and_reduces_cupping():
    bare = tube_spectrum(160, use_spekpy=False)
    cu = tube_spectrum(160, ("Cu", 1.0), use_spekpy=False)
    assert 20 < bare.mean_kev < cu.mean_kev < 160
    assert abs(bare.weights.sum() - 1) < 1e-9 and (bare.energies_kev < 160).all()
    lab, rec, _ = uniform_cylinder()
    _, sc = scanner_for(90, pores_per_mm3=0, inclusions_per_mm3=0, beam_filter=("Cu", 1.0))
    rec_cu = sc.scan(lab)
    c0, r0 = ring_means(rec, lab)
    c1, r1 = ring_means(rec_cu, lab)
    assert c1 / r1 > c0 / r0


def test_spekpy_spectrum_when_installed():
    pytest.importorskip("spekpy")
    s = tube_spectrum(120, use_spekpy=True)
    assert s.source.startswith("spekpy") and 30 < s.mean_kev < 80
    assert s.energies_kev.max() < 120 and abs(s.weights.sum() - 1) < 1e-9


def test_higher_dose_less_noise():
    stds = []
    for dose in (1e3, 1e5):
        lab, rec, _ = uniform_cylinder(mono=80, dose=dose)
        c = (np.array(lab.shape) - 1) / 2
        yy, xx = np.indices(lab.shape)
        stds.append(rec[np.hypot(yy - c[0], xx - c[1]) < 12].std())
    assert stds[1] < 0.3 * stds[0], stds


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_pores_darker_inclusions_brighter_than_material(geometry):
    ph, sc = scanner_for(120, 1e5, geometry, voxel=0.05, pores_per_mm3=30, pore_size=0.3, pore_mix=(1, 0, 0),
                         inclusions_per_mm3=8, inclusion_size=0.25, seed=2)
    lab = ph.render(0, 4)
    rec = np.stack([sc.scan(lab[z], z) for z in range(4)])
    mean = [rec[lab == k].mean() for k in (MATERIAL, PORE, INCLUSION)]
    assert mean[1] < 0.8 * mean[0] and mean[2] > 2 * mean[0], mean


def test_sparse_projectors_agree_with_full_ones():
    from skimage.transform import radon
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64), np.float32)
    for y, x in rng.integers(16, 48, (4, 2)):
        img[y:y + 2, x:x + 3] = 1
    pix = np.argwhere(img > 0)
    theta = np.linspace(0, 180, 37, endpoint=False)
    full = radon(img, theta, circle=True, preserve_range=True).T
    assert np.abs(ParallelBeam(64, theta).project(img, pix) - full).max() < 1e-3
    fb = FanBeam(64, 40)
    assert np.abs(fb.project(img, None, pix - fb.c) - fb.project(img)).max() < 1e-3


# ----------------------------------------------------------------------------- STL and command line


def _box_stl(path, size=(1.0, 0.6, 0.5), ascii=False):
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float)
    v *= np.array(size)
    faces = [(0, 2, 1), (0, 3, 2), (4, 5, 6), (4, 6, 7), (0, 1, 5), (0, 5, 4), (1, 2, 6), (1, 6, 5), (2, 3, 7),
             (2, 7, 6), (3, 0, 4), (3, 4, 7)]
    tri = v[np.array(faces)].astype(np.float32)
    if ascii:
        lines = ["solid box"] + [ln for t in tri for ln in
                                 ["facet normal 0 0 0", "outer loop", *(f"vertex {a} {b} {c}" for a, b, c in t),
                                  "endloop", "endfacet"]] + ["endsolid box"]
        path.write_text("\n".join(lines))
    else:
        path.write_bytes(b"\0" * 80 + struct.pack("<I", len(tri))
                         + b"".join(np.zeros(3, np.float32).tobytes() + t.tobytes() + b"\0\0" for t in tri))
    return path


@pytest.mark.parametrize("ascii", [False, True])
def test_stl_box_is_voxelised_to_its_size(tmp_path, ascii):
    p = _box_stl(tmp_path / "box.stl", ascii=ascii)
    assert read_stl(p).shape == (12, 3, 3)
    ph = make_am_phantom((40, 64, 64), stl=StlPart(p, (40, 64, 64), 0.02), voxel_size=0.02,
                         pores_per_mm3=0, inclusions_per_mm3=0)
    lab = ph.render(0, 40)
    extent = [len(np.flatnonzero(lab.any(axis=ax))) for ax in ((1, 2), (0, 2), (0, 1))]  # z, y, x
    assert abs(extent[0] - 25) <= 1 and abs(extent[1] - 30) <= 1 and abs(extent[2] - 50) <= 1
    assert abs(int(lab.sum()) - 50 * 30 * 25) < 0.05 * 50 * 30 * 25


def test_cli_writes_outputs_that_load(run_cli, tmp_path):
    out = tmp_path / "sim"
    code, _, err = run_cli("simulate", out, "--shape", 4, 64, 64, "--views", 30, "--voxel-size", 0.05,
                                "--pores-per-mm3", 50, "--pore-size", 0.2, "--inclusions-per-mm3", 10,
                                "--inclusion-size", 0.15, "--no-progress", "--workers", 2)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["image.tif", "labels.tif", "simulate.json"]
    with open_volume(out / "image.tif") as img, open_volume(out / "labels.tif") as lab:
        assert img.shape == lab.shape == (4, 64, 64)
        assert img.dtype == np.uint16 and lab.dtype == np.uint8
        assert img.voxel_size == pytest.approx((0.05,) * 3) and lab.voxel_size == pytest.approx((0.05,) * 3)
        labels, image = lab.read(0, 4), img.read(0, 4)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels == PORE).any()
    assert image[labels == MATERIAL].mean() > image[labels == 0].mean()
    summary = json.loads((out / "simulate.json").read_text())
    assert summary["class_voxels"]["pore"] == int((labels == PORE).sum())
    assert summary["labels"] == {"0": "air", "1": "material", "2": "pore", "3": "inclusion"}
    # same seed, one worker, float32: the same labels; float32 grey is mu in 1/mm
    code, _, err = run_cli("simulate", tmp_path / "f", "--shape", 4, 64, 64, "--views", 30, "--voxel-size", 0.05,
                           "--pores-per-mm3", 50, "--pore-size", 0.2, "--inclusions-per-mm3", 10,
                           "--inclusion-size", 0.15, "--no-progress", "--workers", 1, "--dtype", "float32",
                           "--geometry", "fan", "--mono", 80)
    assert code == 0, err
    with open_volume(tmp_path / "f" / "labels.tif") as lab, open_volume(tmp_path / "f" / "image.tif") as img:
        assert np.array_equal(lab.read(0, 4), labels)
        assert img.dtype == np.float32
        mu = img.read(0, 4)[labels == MATERIAL].mean()
    assert mu == pytest.approx(float(mu_per_mm(MATERIALS["alsi10mg"], [80])[0]), rel=0.1)


@pytest.mark.parametrize("args, message", [
    (["--views", "1"], "--views must be >= 2"),
    (["--beam-filter", "Xx", "1"], "unknown beam filter"),
    (["--beam-filter", "Cu", "thick"], "--beam-filter takes"),
    (["--pore-size", "0"], "--pore-size must be a finite number > 0"),
    (["--pore-size", "nan"], "--pore-size must be a finite number > 0"),
    (["--pores-per-mm3", "nan"], "--pores-per-mm3 must be a finite number >= 0"),
    (["--pore-mix", "nan", "1", "1"], "--pore-mix takes three non-negative"),
    (["--dose", "nan"], "--dose must be a finite number >= 0"),
    (["--beam-filter", "Cu", "inf"], "beam filter thickness must be a finite number"),
    (["--voxel-size", "-1"], "argument --voxel-size: -1: voxel_size entries must be positive"),
    (["--voxel-size", "nan"], "argument --voxel-size: nan: voxel_size entries must be positive and finite"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["--workers", "-1"], "argument --workers: must be an integer >= 0"),
    (["--kvp", "5"], "--kvp 5 is out of range"),
    (["--stl", "missing.stl"], "cannot read the STL"),
])
def test_cli_errors_are_one_line_and_leave_no_outputs(run_cli, tmp_path, args, message):
    out = tmp_path / "sim"
    code, _, err = run_cli("simulate", out, "--shape", 2, 32, 32, "--no-progress", *args)
    assert code == 2 and err.startswith("xctrt: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_run_that_fails_midway_leaves_no_folder(tmp_path, monkeypatch):
    import xctrt.simulate as sim

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sim, "grey_map", broken)   # fails on the first image page, after labels.tif
    out = tmp_path / "new" / "sim"
    with pytest.raises(XctrtError, match=r"image.tif: cannot write \(No space left on device\)"):
        simulate(out, SimConfig(shape=(2, 32, 32), views=8), workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stl_that_does_not_fit_is_refused(run_cli, tmp_path):
    p = _box_stl(tmp_path / "big.stl", size=(5.0, 5.0, 1.0))
    code, _, err = run_cli("simulate", tmp_path / "o", "--shape", 2, 32, 32, "--stl", p, "--no-progress")
    assert code == 2 and "does not fit the field of view" in err
    assert not (tmp_path / "o").exists()


def test_output_does_not_depend_on_the_number_of_workers(tmp_path):
    cfg = SimConfig(shape=(5, 48, 48), views=24, voxel_size=0.05, pores_per_mm3=50, pore_size=0.2, seed=9)
    simulate(tmp_path / "one", cfg, workers=1, progress=False, slab=2)
    simulate(tmp_path / "two", cfg, workers=2, progress=False, slab=3)
    for name in ("image.tif", "labels.tif"):
        with open_volume(tmp_path / "one" / name) as a, open_volume(tmp_path / "two" / name) as b:
            assert np.array_equal(a.read(0, 5), b.read(0, 5))
