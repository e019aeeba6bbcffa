"""CycleGAN (training/cyclegan.py): networks, losses, image pool, schedule, resume, translate + survival.

Tiny configs (2 residual blocks, 8-channel networks, 32² crops, a few steps) on phantoms in tmp_path.
"""
from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training import cyclegan  # noqa: E402
from training.cyclegan import (CycleGANTrainer, ImagePool, PatchDiscriminator, ResnetBlock,  # noqa: E402
                               ResnetGenerator, defect_visibility, lr_factor, parse_train_args)
import tifffile  # noqa: E402

from xctrt.phantom import make_phantom  # noqa: E402

torch.set_num_threads(2)
TINY = ["--crop", "32", "--ngf", "8", "--ndf", "8", "--blocks", "2", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    sim, real = root / "sim", root / "real"
    for d, seed, dtype in ((sim, 0, np.uint16), (real, 1, np.uint8)):
        d.mkdir()
        # many pores and inclusions, so the survival check has components to score
        image, labels = make_phantom((6, 40, 40), seed=seed, dtype=dtype, pores_per_mvox=3000,
                                     inclusions_per_mvox=600).render(0, 6)
        tifffile.imwrite(d / "image.tif", image)
        tifffile.imwrite(d / "labels.tif", labels, compression="zlib")
    return sim, real


def test_generator_shape_range_and_architecture():
    g = ResnetGenerator(ngf=8, n_blocks=2)
    x = torch.randn(2, 1, 32, 32) * 50          # far outside [-1, 1]: tanh still bounds the output
    with torch.no_grad():
        y = g(x)
    assert y.shape == x.shape and float(y.abs().max()) <= 1.0
    full = ResnetGenerator()                    # the paper's: c7s1-64, d128, d256, 9 blocks, u128, u64, c7s1-1
    mods = list(full.net)
    assert sum(isinstance(m, ResnetBlock) for m in mods) == 9
    convs = [m for m in full.net.modules() if isinstance(m, torch.nn.Conv2d) and not isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs[:3]] == [64, 128, 256] and convs[0].kernel_size == (7, 7)
    ups = [m for m in mods if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [u.out_channels for u in ups] == [128, 64]
    assert isinstance(mods[-1], torch.nn.Tanh) and mods[-2].kernel_size == (7, 7) and mods[-2].out_channels == 1
    assert any(isinstance(m, torch.nn.ReflectionPad2d) for m in mods)
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in mods)


def test_patch_discriminator_is_70x70():
    d = PatchDiscriminator(ndf=8)
    assert d(torch.randn(1, 1, 256, 256)).shape == (1, 1, 30, 30)   # the reference 70×70 PatchGAN's map size
    # receptive field of one output: 4 convs k4 (s2, s2, s2, s1) + final k4 s1 = 70 pixels
    rf, jump = 1, 1
    for m in d.net:
        if isinstance(m, torch.nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * jump
            jump *= m.stride[0]
    assert rf == 70


def test_image_pool_fills_then_swaps_half_the_time():
    rng = np.random.default_rng(0)
    pool = ImagePool(4)
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first, rng), first)       # filling: returns what it got
    past = new = 0
    for i in range(2000):
        img = torch.full((1, 1, 1, 1), 100.0 + i)
        out = pool.query(img, rng)
        if float(out) == 100.0 + i:
            new += 1
        else:
            past += 1
            assert float(out) < 100.0 + i                   # an image stored earlier
    assert len(pool.images) == 4
    assert abs(past / 2000 - 0.5) < 0.05
    assert torch.equal(ImagePool(0).query(first, rng), first)


def test_lr_schedule_constant_then_linear_to_zero(domains):
    assert [lr_factor(s, 10, 5) for s in (0, 4, 5, 6, 9, 10)] == [1, 1, 1, 0.8, 0.2, 0]
    sim, real = domains
    args = parse_train_args(["--sim", str(sim), "--real", str(real), *TINY, "--steps", "8", "--steps-per-epoch", "2",
                             "--lr", "1e-3", "-o", "/dev/null"])
    tr = CycleGANTrainer(args, log=lambda s: None)
    lrs = [tr.lr_at(s) for s in range(9)]
    assert lrs[:4] == [1e-3] * 4                                            # first half: constant
    assert np.allclose(lrs[4:], [1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0])      # then linear, 0 at the end
    assert lrs[-2] > 0                                                      # the last step still learns


def test_losses_finite_resume_and_translate(domains, tmp_path):
    sim, real = domains
    ck = tmp_path / "gan.pt"
    common = ["--sim", str(sim), "--real", str(real / "image.tif"), *TINY, "--steps-per-epoch", "2", "-o", str(ck)]
    tr = cyclegan.main(["train", *common, "--steps", "2"])
    assert tr.step == 2 and len(tr.history) == 1
    loss = tr.history[0]["loss"]
    assert set(loss) >= {"G_adv_AB", "G_adv_BA", "cyc_A", "cyc_B", "idt_A", "idt_B", "D_A", "D_B", "G"}
    assert all(np.isfinite(v) for v in loss.values())
    before = {k: v.clone() for k, v in tr.G_AB.state_dict().items()}

    tr2 = cyclegan.main(["train", *common, "--steps", "4", "--resume"])
    assert tr2.step == 4 and [h["step"] for h in tr2.history] == [2, 4]      # continued, not restarted
    ckpt = torch.load(ck, map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["real_dtype"] == "uint8"
    assert any(not torch.equal(before[k], v) for k, v in ckpt["nets"]["G_AB"].items())

    out = tmp_path / "translated"
    res = cyclegan.main(["translate", str(ck), str(sim), str(out), "--device", "cpu"])
    img = tifffile.imread(out / "image.tif")
    assert img.dtype == np.uint8 and img.shape == (6, 40, 40)
    assert filecmp.cmp(out / "labels.tif", sim / "labels.tif", shallow=False)   # the labels, byte for byte
    js = json.loads((out / "translate.json").read_text())
    assert js["defects"]["pore"]["components"] >= 1
    for key in ("recall_sim", "recall_translated", "survival", "visible_sim", "visible_translated"):
        assert key in js["defects"]["pore"]
    assert res["defects"] == js["defects"]
    assert sorted(p.name for p in out.iterdir()) == ["image.tif", "labels.tif", "translate.json"]   # no leftovers


def test_defect_visibility_hand_made():
    rng = np.random.default_rng(0)
    lab = np.ones((8, 24, 24), np.uint8)
    lab[2:4, 4:7, 4:7] = 2          # pore 1
    lab[5:7, 14:17, 14:17] = 2      # pore 2
    lab[2:4, 15:17, 4:6] = 3        # inclusion
    sim = 100 + rng.normal(0, 2, lab.shape)
    sim[lab == 2] = 40
    sim[lab == 3] = 200
    washed = sim.copy()
    washed[5:7, 14:17, 14:17] = 100     # the translation filled pore 2 in
    washed[lab == 3] = 101              # and the inclusion
    r = defect_visibility({"sim": sim.astype(np.float32), "translated": washed.astype(np.float32)}, lab, k=2)
    assert r["pore"]["components"] == 2 and r["pore"]["scored"] == 2
    assert r["pore"]["recall_sim"] == 1.0 and r["pore"]["recall_translated"] == 0.5 and r["pore"]["survival"] == 0.5
    assert r["inclusion"]["recall_sim"] == 1.0 and r["inclusion"]["recall_translated"] == 0.0
