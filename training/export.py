"""Export trained Conv-LoRA SAM models to ONNX and write an xctrt model package.

    python -m training.export runs/vitb.pt -o models/vitb-paper [--base sam_vit_b_01ec64.pth]
    python -m training.export runs/shared.pt -o python/xctrt/models/NAME --weights-fp16 [--card card.json]

Before export each adapter is prepared on a copy of the model:
- the linear LoRA part is merged: W0 <- W0 + s·B·A, so the graph has no A·x → B·(·) detour for it;
- the Conv-MoE branch s·B·E_k(A·x) cannot be merged (resampling, conv, GELU and a data-dependent
  choice of k), so it stays in the graph, evaluated statically: all 8 experts run and a one-hot of
  the gate's argmax selects one (no `nonzero`, no data-dependent Python control flow). Fixed shapes
  suit TensorRT and CUDA graphs; on a CPU the runtime routes each window to its expert only
  (xctrt.graph_rewrites.route_experts, which recognises exactly this form: keep them in step) and
  runs the experts' bicubic resampling as matrix products (graph_rewrites.resize_as_matmul, which
  takes the Resize torch.onnx writes for F.interpolate(mode="bicubic", align_corners=False)).

Graphs follow the runtime contract: input `image` float32 (N, 1, S, S) in [0, 1], output `probs`
float32 (N, C, S, S), dynamic batch axis, opset 17. Paper mode writes one graph per class,
shared mode one graph with one output channel per class.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .conv_lora import conv_lora_modules
from .data import CLASS_IDS

OPSET = 17
PRIORITY = ["inclusion", "pore", "material"]      # highest first, then air
PROTOBUF_LIMIT = 2 ** 31 - 1


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A copy in eval mode with LoRA merged and the expert choice made graph-static."""
    model = copy.deepcopy(model).float().eval()
    for m in conv_lora_modules(model):
        m.merge_()
        m.static_select = True
    return model


class _ExportWrapper(nn.Module):
    def __init__(self, model: nn.Module, with_logits: bool):
        super().__init__()
        self.model, self.with_logits = model, with_logits

    def forward(self, image):
        logits = self.model.logits(image)
        probs = torch.sigmoid(logits)
        return (probs, logits) if self.with_logits else probs


def export_onnx(model: nn.Module, with_logits: bool = False, batch: int = 2) -> bytes:
    """XctSam -> ONNX bytes (input `image`, output `probs` [and `logits`]). Prepares a copy itself."""
    size = model.image_size
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    if n_bytes > PROTOBUF_LIMIT - 64 * 2 ** 20:
        raise ValueError(f"the fp32 graph would hold {n_bytes / 2**30:.2f} GiB of weights, over ONNX's 2 GiB "
                         "single-file limit; model packages keep each graph in one file (ViT-H does not fit)")
    wrapper = _ExportWrapper(prepare_for_export(model), with_logits).eval()
    dummy = torch.rand(batch, 1, size, size)
    outputs = ["probs", "logits"] if with_logits else ["probs"]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # SAM's shape arithmetic; shapes are fixed
        warnings.simplefilter("ignore", DeprecationWarning)        # the TorchScript exporter's own notice
        # The TorchScript-based exporter: it needs no onnxscript and handles SAM's ops at opset 17.
        torch.onnx.export(wrapper, (dummy,), buf, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in ["image"] + outputs},
                          do_constant_folding=True)
    return buf.getvalue()


FP16_MIN_ELEMENTS = 1024
FP16_MAX = 65504.0


def store_weights_fp16(model, min_elements: int = FP16_MIN_ELEMENTS):
    """A copy of an ONNX ModelProto whose large float32 weights are stored as float16, each followed
    by a Cast back to float32, so the file roughly halves and every op still computes in float32
    (ONNX Runtime folds the Casts into float32 constants when it loads the session).

    Converted: float32 initializers and Constant-node tensors with more than `min_elements` elements
    whose finite values all fit float16's range; the rest (shape constants, small biases, norms) stay
    as they are. The converted tensor is renamed `<name>__fp16` and the Cast writes the original name,
    so no consumer changes. Only the main graph's initializers and Constant nodes are converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = {n for node in g.node for n in list(node.input) + list(node.output)}
    taken |= {t.name for t in g.initializer} | {i.name for i in g.input}
    graph_inputs = {i.name for i in g.input}

    def half(t) -> TensorProto | None:
        if t.data_type != TensorProto.FLOAT or int(np.prod(t.dims, dtype=np.int64)) <= min_elements:
            return None
        a = numpy_helper.to_array(t)
        if not np.isfinite(a).all() or float(np.abs(a).max(initial=0.0)) > FP16_MAX:
            return None
        return numpy_helper.from_array(a.astype(np.float16))

    def fresh(name: str) -> str:
        new, i = f"{name}__fp16", 1
        while new in taken:
            new, i = f"{name}__fp16_{i}", i + 1
        taken.add(new)
        return new

    def cast(src: str, dst: str):
        return helper.make_node("Cast", [src], [dst], name=f"{dst}__cast_fp32", to=TensorProto.FLOAT)

    casts, inits = [], []
    for t in g.initializer:
        h = None if t.name in graph_inputs else half(t)   # an initializer that is also an input can be overridden
        if h is None:
            inits.append(t)
            continue
        h.name = fresh(t.name)
        inits.append(h)
        casts.append(cast(h.name, t.name))
    nodes = []
    for node in g.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        h = half(attr.t) if attr is not None and attr.name == "value" else None
        if h is None:
            nodes.append(node)
            continue
        name = node.output[0]
        const = helper.make_node("Constant", [], [fresh(name)], name=node.name, value=h)
        nodes += [const, cast(const.output[0], name)]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(casts + nodes)
    return out


def _weights_fp16_bytes(graph: bytes) -> bytes:
    import onnx

    return store_weights_fp16(onnx.load_from_string(graph)).SerializeToString()


def _versions() -> dict:
    import onnx

    v = {"torch": torch.__version__, "onnx": onnx.__version__, "onnx_opset": OPSET}
    try:
        from importlib.metadata import version
        v["segment_anything"] = version("segment-anything")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return v


def onnx_parity(model: nn.Module, graph: bytes, batch: int = 1, seed: int = 0) -> float:
    """Max |p_torch - p_onnxruntime| for an exported graph on random inputs in [0, 1]."""
    import onnxruntime as ort

    size = model.image_size
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return float(np.abs(sess.run(None, {"image": x.numpy()})[0] - ref).max())


def write_model_package(out: str | Path, models: dict[str, nn.Module], mode: str, classes: list[str], *,
                        backbone: str, input_mode: str = "tile", overlap: int | None = None,
                        window: dict | None = None, training_data=None, metrics: dict | None = None,
                        trained: bool = True, name: str | None = None, description: str = "",
                        check: bool = True, weights_fp16: bool = False, check_images: np.ndarray | None = None,
                        check_images_note: str | None = None, card: dict | None = None) -> Path:
    """Export `models` ({class: XctSam} in paper mode, {"shared": XctSam} in shared mode) to a package.

    check: compare each graph with its PyTorch model on one random input and record the largest
    probability difference in the manifest (export_check).
    weights_fp16: store large weights as float16 + Cast (store_weights_fp16; about half the size,
    float32 compute); the manifest says so under `weights`, and export_check then also holds the
    largest difference between the float16-stored and the float32 graph.
    check_images: (N, S, S) float32 in [0, 1] (e.g. windowed crops of a real volume, see
    volume_crops): with weights_fp16, the float16-vs-float32 difference is also measured on these.
    card: extra manifest fields (model card: recipe, compute, seed, ...); `metrics` merges key by key."""
    from xctrt.model import write_package

    first = next(iter(models.values()))
    size = first.image_size
    if mode == "paper":
        missing = [c for c in classes if c not in models]
        if missing:
            raise ValueError(f"paper mode needs one model per class; missing {missing}")
        sources = {f"{c}.onnx": models[c] for c in classes}
        graphs = [{"file": f"{c}.onnx", "outputs": [c]} for c in classes]
    elif mode == "shared":
        if first.num_heads != len(classes):
            raise ValueError(f"shared model has {first.num_heads} heads for {len(classes)} classes")
        sources = {"model.onnx": first}
        graphs = [{"file": "model.onnx", "outputs": list(classes)}]
    else:
        raise ValueError(f"mode must be 'paper' or 'shared', not {mode!r}")
    files32 = {f: export_onnx(m) for f, m in sources.items()}
    files = {f: _weights_fp16_bytes(b) for f, b in files32.items()} if weights_fp16 else files32
    manifest = {
        "name": name or Path(out).stem,
        "trained": bool(trained),
        "description": description or f"Conv-LoRA SAM ({backbone}), {mode} mode",
        "backbone": f"{backbone} + Conv-LoRA ({mode} mode)",
        "training_data": training_data or "none",
        "classes": [{"id": CLASS_IDS[c], "name": c, "threshold": 0.5} for c in classes],
        "aggregation": "priority",
        "priority": [c for c in PRIORITY if c in classes],
        "input": {"size": size, "mode": input_mode, "overlap": size // 8 if overlap is None else overlap,
                  "blend": "ramp", "pad": "edge"},
        "intensity_window": window or {"mode": "percentile", "low": 0.5, "high": 99.5},
        "graphs": graphs,
        "metrics": dict(metrics or {}),
        "weights": ({"storage": "float16", "compute": "float32",
                     "note": f"float32 weights with more than {FP16_MIN_ELEMENTS} elements are stored as "
                             "float16, each followed by a Cast to float32 in the graph (ONNX Runtime folds "
                             "the Casts at session load); training.export --weights-fp16"}
                    if weights_fp16 else {"storage": "float32", "compute": "float32"}),
        "versions": _versions(),
    }
    for k, v in (card or {}).items():
        if k == "metrics" and isinstance(v, dict):
            manifest["metrics"].update(v)
        else:
            manifest[k] = v
    if check:
        diff = max(onnx_parity(sources[f], files[f]) for f in files)
        manifest["export_check"] = {"max_abs_diff_probs": diff, "inputs": "1 random image per graph",
                                    "runtime": "onnxruntime CPU", "compares": "PyTorch (fp32) vs the shipped graph"}
        if weights_fp16:
            rand = torch.rand(2, size, size, generator=torch.Generator().manual_seed(1)).numpy()
            manifest["export_check"]["fp16_vs_fp32_random"] = dict(
                _worst([graph_diff(files32[f], files[f], rand) for f in files]), inputs="2 random images per graph")
    if weights_fp16 and check_images is not None:
        manifest["export_check"] = dict(manifest.get("export_check", {}), fp16_vs_fp32_real=dict(
            _worst([graph_diff(files32[f], files[f], check_images) for f in files]),
            inputs=check_images_note or f"{len(check_images)} windowed {size}² crops of a real volume",
            runtime="onnxruntime CPU", decision="p >= 0.5, per output channel"))
    return write_package(Path(out), manifest, files)


def graph_diff(graph_a: bytes, graph_b: bytes, images: np.ndarray, batch: int = 2,
               threshold: float = 0.5) -> dict:
    """Two ONNX graphs (onnxruntime CPU) on images (N, S, S) in [0, 1]: the largest and mean
    |p_a - p_b| and the fraction of pixels whose p >= threshold decision differs, per output channel."""
    import onnxruntime as ort

    x = np.ascontiguousarray(images, np.float32)[:, None]
    sa, sb = (ort.InferenceSession(g, providers=["CPUExecutionProvider"]) for g in (graph_a, graph_b))
    pa = np.concatenate([sa.run(None, {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    pb = np.concatenate([sb.run(None, {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    d = np.abs(pa - pb)
    return {"max_abs_diff_probs": float(d.max()), "mean_abs_diff_probs": float(d.mean()),
            "decision_flip_fraction": [float(f) for f in ((pa >= threshold) != (pb >= threshold))
                                       .mean(axis=(0, 2, 3))]}


def _worst(diffs: list[dict]) -> dict:
    return max(diffs, key=lambda d: d["max_abs_diff_probs"])


def volume_crops(volume: str | Path, size: int, n: int = 4, window: dict | None = None,
                 seed: int = 0) -> np.ndarray:
    """n random size² crops (N, S, S) in [0, 1] from evenly spaced slices of a volume, windowed as
    the runtime windows it (the package's percentile window over xctrt's sample slices)."""
    from xctrt import _core
    from xctrt.io import open_volume

    window = window or {"mode": "percentile", "low": 0.5, "high": 99.5}
    src = open_volume(volume)
    if window["mode"] == "fixed":
        lo, hi = float(window["low"]), float(window["high"])
    else:
        sample = src.sample_slices(16)[:, ::2, ::2]
        lo, hi = (float(v) for v in np.percentile(sample, [float(window["low"]), float(window["high"])]))
        hi = hi if hi > lo else lo + 1.0
    z, h, w = src.shape
    if h < size or w < size:
        raise ValueError(f"{volume}: slices {h}x{w} are smaller than the {size}² crops")
    rng = np.random.default_rng(seed)
    crops = []
    for k in np.linspace(0, z - 1, n).round().astype(int):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crops.append(_core.window(np.ascontiguousarray(src.read(int(k), int(k) + 1)[0, y:y + size, x:x + size]),
                                  lo, hi))
    return np.stack(crops)


def export_checkpoint(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                      name: str | None = None, check: bool = True, weights_fp16: bool = False,
                      check_volume: str | Path | None = None, card: dict | None = None) -> Path:
    from .train import build_from_checkpoint

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    models = build_from_checkpoint(ckpt, base_checkpoint=base)
    cfg = ckpt["config"]
    images = note = None
    if weights_fp16 and check_volume is not None:
        images = volume_crops(check_volume, cfg["input_size"], window=cfg.get("intensity_window"))
        note = (f"{len(images)} random {cfg['input_size']}² crops (seed 0) from evenly spaced slices of "
                f"{Path(check_volume).parent.name}/{Path(check_volume).name}, windowed as the runtime does")
    return write_model_package(
        out, models, ckpt["mode"], ckpt["classes"], backbone=ckpt["backbone"], input_mode=cfg["input_mode"],
        overlap=cfg["overlap"], window=cfg.get("intensity_window"), training_data=ckpt.get("training_data"),
        metrics=ckpt.get("metrics"), trained=ckpt.get("step", 0) > 0, name=name, check=check,
        weights_fp16=weights_fp16, check_images=images, check_images_note=note,
        card={"seed": cfg.get("seed"), "training_versions": ckpt.get("versions"), **(card or {})},
        description=f"Conv-LoRA SAM ({ckpt['backbone']}, r={cfg['rank']}, alpha={cfg['alpha']:g}), "
                    f"{ckpt['mode']} mode, {ckpt.get('step', 0)} steps; from {Path(checkpoint).name}")


def check_package(out: str | Path, models: dict[str, nn.Module], classes: list[str], batch: int = 2,
                  seed: int = 0) -> float:
    """Max |p_torch - p_onnxruntime| on random inputs through the runtime's own loader and engine."""
    from xctrt.backends import make_engine
    from xctrt.model import load_package

    pkg = load_package(out)
    engine = make_engine(pkg, "onnxruntime")
    size = pkg.input_size
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    ordered = [models["shared"]] if "shared" in models else [models[c] for c in classes]
    with torch.no_grad():
        ref = torch.cat([m.eval()(x) for m in ordered], 1).numpy()
    got = engine.run(x.numpy())
    return float(np.abs(ref - got).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="training checkpoint (training/train.py)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="model package folder (or .zip) to write")
    ap.add_argument("--base", type=Path, default=None, help="SAM weights, when the checkpoint's base path moved")
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-check", action="store_true",
                    help="skip the PyTorch vs ONNX Runtime check (one random image per graph)")
    ap.add_argument("--weights-fp16", action="store_true",
                    help="store large weights as float16 (+ Cast to float32 in the graph): about half the "
                         "size, float32 compute; use it for packages kept in the repository")
    ap.add_argument("--check-volume", type=Path, default=None,
                    help="with --weights-fp16: also record the fp16-vs-fp32 difference on 4 windowed crops "
                         "of this volume (e.g. a test image.tif)")
    ap.add_argument("--card", type=Path, default=None,
                    help="JSON of extra manifest fields (model card: recipe, compute, seed, metrics, ...)")
    args = ap.parse_args(argv)
    from xctrt.errors import XctrtError

    try:
        card = json.loads(args.card.read_text()) if args.card else None
        out = export_checkpoint(args.checkpoint, args.out, args.base, args.name, check=not args.no_check,
                                weights_fp16=args.weights_fp16, check_volume=args.check_volume, card=card)
    except (ValueError, FileNotFoundError, XctrtError) as exc:   # JSONDecodeError is a ValueError
        sys.exit(f"error: {exc}")
    from xctrt.model import load_package

    m = load_package(out).manifest
    print(json.dumps({"package": str(out), "weights": m.get("weights"), "export_check": m.get("export_check")}))


if __name__ == "__main__":
    main()
