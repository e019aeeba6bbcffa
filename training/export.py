"""Export trained Conv-LoRA SAM models to ONNX and write an xctrt model package.

    python -m training.export runs/vitb.pt -o models/vitb-paper [--base sam_vit_b_01ec64.pth]

Before export each adapter is prepared on a copy of the model:
- the linear LoRA part is merged: W0 <- W0 + s·B·A, so the graph has no A·x → B·(·) detour for it;
- the Conv-MoE branch s·B·E_k(A·x) cannot be merged (resampling, conv, GELU and a data-dependent
  choice of k), so it stays in the graph, evaluated statically: all 8 experts run and a one-hot of
  the gate's argmax selects one (no `nonzero`, no data-dependent Python control flow).

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
                        check: bool = True) -> Path:
    """Export `models` ({class: XctSam} in paper mode, {"shared": XctSam} in shared mode) to a package.

    check: compare each graph with its PyTorch model on one random input and record the largest
    probability difference in the manifest (export_check)."""
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
    files = {f: export_onnx(m) for f, m in sources.items()}
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
        "metrics": metrics or {},
        "versions": _versions(),
    }
    if check:
        diff = max(onnx_parity(sources[f], files[f]) for f in files)
        manifest["export_check"] = {"max_abs_diff_probs": diff, "inputs": "1 random image per graph",
                                    "runtime": "onnxruntime CPU"}
    return write_package(Path(out), manifest, files)


def export_checkpoint(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                      name: str | None = None, check: bool = True) -> Path:
    from .train import build_from_checkpoint

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    models = build_from_checkpoint(ckpt, base_checkpoint=base)
    cfg = ckpt["config"]
    return write_model_package(
        out, models, ckpt["mode"], ckpt["classes"], backbone=ckpt["backbone"], input_mode=cfg["input_mode"],
        overlap=cfg["overlap"], window=cfg.get("intensity_window"), training_data=ckpt.get("training_data"),
        metrics=ckpt.get("metrics"), trained=ckpt.get("step", 0) > 0, name=name, check=check,
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
    args = ap.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.base, args.name, check=not args.no_check)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    from xctrt.model import load_package

    m = load_package(out).manifest
    print(json.dumps({"package": str(out), "export_check": m.get("export_check")}))


if __name__ == "__main__":
    main()
