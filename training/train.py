"""Fine-tune Conv-LoRA SAM on labelled XCT volumes.

paper mode:  one binary model per class (material, pore, inclusion); every step updates each.
shared mode: one encoder (one set of adapters) with one decoder head per class (ours).

    python -m training.train --data ../shared/data/smg/train/pair_1 --backbone sam_vit_b \
        --sam-checkpoint sam_vit_b_01ec64.pth --mode paper --steps 4000 -o runs/vitb.pt

Loss per model: structure loss + the summed Conv-LoRA balancing losses. AdamW on the trainable
set only. Checkpoints (written atomically at every epoch end) hold everything needed to resume
(`--resume`) and to export (`python -m training.export CKPT -o MODEL_DIR`).

Checkpoint format (a torch.save dict, FORMAT below):
    backbone, base_checkpoint   backbone name and the SAM weights it started from (path or None)
    mode, classes, config       run settings (rank, alpha, input mode/size/overlap, window, ...)
    frozen                      frozen weights (only when base_checkpoint is None: random init)
    models                      {class: trainable state} (paper) or {"shared": trainable state}
    optimizers, step, rng, history, metrics, training_data
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .common import load_train_val, run_main
from .conv_lora import balance_loss, trainable_parameter_count
from .data import CLASS_IDS, CropSampler, load_volume, split_volume
from .losses import structure_loss
from .sam_model import BUNDLED_WEIGHTS, build_xct_sam

FORMAT = "xctrt-convlora-ckpt/1"
SHARED = "shared"


# ---------------------------------------------------------------------- checkpoint helpers

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n not in train}


def build_from_checkpoint(ckpt: dict, base_checkpoint: str | Path | None = None, device="cpu"
                          ) -> dict[str, torch.nn.Module]:
    """Rebuild the models of a training checkpoint: {class: XctSam} (paper) or {"shared": XctSam}."""
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"not an xctrt Conv-LoRA checkpoint (format {ckpt.get('format')!r}, expected {FORMAT!r})")
    cfg = ckpt["config"]
    base_path = base_checkpoint or ckpt.get("base_checkpoint")
    if ckpt.get("frozen") is None and base_path is None and ckpt["backbone"] not in BUNDLED_WEIGHTS:
        raise ValueError("checkpoint holds no frozen weights and names no base SAM checkpoint")
    heads = len(ckpt["classes"]) if ckpt["mode"] == SHARED else 1
    base = build_xct_sam(ckpt["backbone"], None if ckpt.get("frozen") is not None else base_path,
                         num_heads=heads, r=cfg["rank"], alpha=cfg["alpha"])
    if ckpt.get("frozen") is not None:
        _load(base, ckpt["frozen"], expect_all_frozen=True)
    models = {}
    for name, state in ckpt["models"].items():
        m = copy.deepcopy(base)
        _load(m, state, expect_all_frozen=False)
        models[name] = m.to(device)
    return models


def _load(model: torch.nn.Module, state: dict, expect_all_frozen: bool) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected:
        raise ValueError(f"checkpoint has weights this model lacks: {unexpected[:5]}")
    # Loading the frozen part must leave only trainable names missing, and vice versa.
    bad = [k for k in missing if (k not in train) == expect_all_frozen]
    if bad:
        raise ValueError(f"checkpoint lacks weights: {bad[:5]}")


def slim_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """A training checkpoint cut down for keeping and export: trainable weights only, cast to `dtype`
    (fp16 halves them; export casts back to fp32), no optimiser, scaler or RNG state (it cannot be
    resumed). Frozen weights are dropped when they equal the backbone's bundled pretrained weights
    (litemedsam), which rebuild them; otherwise they are kept as they are."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{src}: not an xctrt Conv-LoRA checkpoint")
    slim = {k: v for k, v in ckpt.items() if k not in ("optimizers", "scaler", "rng")}
    slim["models"] = {n: {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in state.items()}
                      for n, state in ckpt["models"].items()}
    slim["slim"] = {"dtype": str(dtype).replace("torch.", ""), "from": Path(src).name}
    frozen = ckpt.get("frozen")
    if frozen is not None and ckpt.get("base_checkpoint") is None and ckpt["backbone"] in BUNDLED_WEIGHTS:
        cfg = ckpt["config"]
        heads = len(ckpt["classes"]) if ckpt["mode"] == SHARED else 1
        ref = frozen_state(build_xct_sam(ckpt["backbone"], num_heads=heads, r=cfg["rank"], alpha=cfg["alpha"]))
        if ref.keys() == frozen.keys() and all(torch.equal(ref[k], frozen[k]) for k in ref):
            slim["frozen"] = None
    save_atomic(slim, Path(dst))
    return Path(dst)


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- training

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="volume folders with image.tif + labels.tif")
    ap.add_argument("--val", nargs="*", default=[], help="validation volume folders (default: hold out the "
                                                         "last --val-fraction of each training volume)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--val-crops", type=int, default=32)
    ap.add_argument("--backbone", default="sam_vit_b")
    ap.add_argument("--sam-checkpoint", default=None, help="segment-anything state dict to start from")
    ap.add_argument("--mode", choices=("paper", "shared"), default="paper")
    ap.add_argument("--classes", default="material,pore,inclusion")
    ap.add_argument("--input-mode", choices=("tile", "resize"), default="tile")
    ap.add_argument("--overlap", type=int, default=None, help="tile overlap recorded for inference "
                                                              "(default: 1/8 of the input size)")
    ap.add_argument("--rank", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=1000, help="total optimiser steps (per model)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-clock budget for this run's training loop (steps, validation, checkpoints). "
                         "The step count is cut to what fits, from the measured step time, so the learning-rate "
                         "schedule still completes; a hard stop at the budget guards the rest")
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--positive-fraction", type=float, default=0.5,
                    help="share of crops anchored on a voxel of the model's class")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                    help="mixed precision on CUDA (auto: bf16 where supported, else fp16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")
    ap.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                    help="draw the next step's crops in a background thread while the device computes "
                         "(auto: on for CUDA)")
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/convlora.pt"), help="checkpoint file")
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    return ap.parse_args(argv)


def _lr(args, step: int, total: int | None = None) -> float:
    """Linear warm-up, then cosine decay to 10% over `total` steps (default --steps)."""
    total = args.steps if total is None else total
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    def __init__(self, args: argparse.Namespace, log=print):
        self.args, self.log = args, log
        if args.threads:
            torch.set_num_threads(args.threads)
        dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        amp = args.amp
        if self.device.type != "cuda":
            amp = "off"
        elif amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        self.amp = amp
        self.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        unknown = [c for c in self.classes if c not in CLASS_IDS]
        if unknown or not self.classes:
            raise ValueError(f"unknown classes {unknown}; choose from {list(CLASS_IDS)}")

        ckpt = None
        if args.resume and args.out.is_file():
            ckpt = torch.load(args.out, map_location="cpu", weights_only=False)
            if ckpt.get("slim"):
                raise ValueError(f"{args.out}: a slim checkpoint (no optimiser state) cannot be resumed")
            for key, want in (("backbone", args.backbone), ("mode", args.mode), ("classes", self.classes)):
                if ckpt[key] != want:
                    raise ValueError(f"{args.out}: cannot resume, its {key} is {ckpt[key]!r}, not {want!r}")

        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self._load_data()

        if ckpt is not None:
            self.models = build_from_checkpoint(ckpt, device=self.device)
            self.base_checkpoint = ckpt.get("base_checkpoint")
            self.step, self.history = int(ckpt["step"]), list(ckpt.get("history", []))
        else:
            heads = len(self.classes) if args.mode == "shared" else 1
            base = build_xct_sam(args.backbone, args.sam_checkpoint, num_heads=heads, r=args.rank, alpha=args.alpha)
            names = [SHARED] if args.mode == "shared" else self.classes
            self.models = {n: (base if i == 0 else copy.deepcopy(base)).to(self.device) for i, n in enumerate(names)}
            self.base_checkpoint = str(Path(args.sam_checkpoint).resolve()) if args.sam_checkpoint else None
            self.step, self.history = 0, []
        self.total_steps = args.steps     # cut by --max-minutes once the step time is known
        first = next(iter(self.models.values()))
        self.size = first.image_size
        self.overlap = args.overlap if args.overlap is not None else self.size // 8
        self.optimizers = {
            n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr,
                                 weight_decay=args.weight_decay)
            for n, m in self.models.items()}
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        if ckpt is not None:
            for n, opt in self.optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][n])
            self.rng.bit_generator.state = ckpt["rng"]["numpy"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            if "scaler" in ckpt and self.amp == "fp16":
                self.scaler.load_state_dict(ckpt["scaler"])
            self.log(f"resumed {args.out} at step {self.step}")
        self.log(f"{args.backbone} {args.mode} mode, classes {self.classes}, input {args.input_mode} "
                 f"{self.size}², {len(self.models)} model(s) x {trainable_parameter_count(first):,} trainable "
                 f"parameters, device {self.device}, amp {self.amp}")
        self._make_samplers()
        self.prefetch = args.prefetch == "on" or (args.prefetch == "auto" and self.device.type == "cuda")
        self._pool, self._pending = None, {}

    # -------------------------------------------------------------- data

    def _load_data(self) -> None:
        a = self.args
        train, val = load_train_val(a.data, a.val, a.val_fraction, load_volume, split_volume)
        ids = [CLASS_IDS[c] for c in self.classes]
        for v in train + val:
            v.index_points(ids, self.rng)
        self.train_volumes, self.val_volumes = train, val
        self.training_data = [f"{Path(d).resolve()} z[{v.z_range[0]}:{v.z_range[1]}]" for d, v in zip(a.data, train)]

    def _make_samplers(self) -> None:
        a = self.args
        ids = [CLASS_IDS[c] for c in self.classes]
        if a.mode == "shared":
            self.samplers = {SHARED: (CropSampler(self.train_volumes, self.size, a.input_mode, ids,
                                                  a.positive_fraction), ids)}
        else:
            self.samplers = {c: (CropSampler(self.train_volumes, self.size, a.input_mode, [CLASS_IDS[c]],
                                             a.positive_fraction), [CLASS_IDS[c]]) for c in self.classes}
        self.val_batch = None
        if self.val_volumes and a.val_crops > 0:
            # A fixed validation set, drawn once with its own seed, unaugmented.
            vs = CropSampler(self.val_volumes, self.size, a.input_mode, ids, 0.5, augment=False)
            self.val_batch = vs.batch(np.random.default_rng(a.seed + 1), a.val_crops, ids)

    # -------------------------------------------------------------- steps

    def _draw(self, name: str):
        sampler, focus = self.samplers[name]
        return sampler.batch(self.rng, self.args.batch_size, focus)

    def _batch(self, name: str):
        """This step's crops for model `name`. With prefetching, they were drawn in a background thread
        during the previous step, and the next step's are queued now; one worker keeps the draws in a
        fixed order, so runs stay reproducible."""
        if not self.prefetch:
            return self._draw(name)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crops")
        fut = self._pending.pop(name, None) or self._pool.submit(self._draw, name)   # every draw on the worker
        self._pending[name] = self._pool.submit(self._draw, name)
        return fut.result()

    def _drain(self) -> None:
        for fut in self._pending.values():
            fut.result()


    def _autocast(self):
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != "off")

    def train_step(self) -> dict[str, float]:
        a, out = self.args, {}
        lr = _lr(a, self.step, self.total_steps)
        for name, model in self.models.items():
            x, t = self._batch(name)
            x, t = x.to(self.device, non_blocking=True), t.to(self.device, non_blocking=True)
            model.train()
            opt = self.optimizers[name]
            for g in opt.param_groups:
                g["lr"] = lr
            with self._autocast():
                logits = model.logits(x)
            task = structure_loss(logits.float(), t)
            bal = balance_loss(model)
            loss = task + (bal.float() if bal is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if a.grad_clip > 0:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], a.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            out[name] = float(loss.detach())
            out[name + ":balance"] = float(bal.detach()) if bal is not None else 0.0
            if not math.isfinite(out[name]):
                raise FloatingPointError(f"step {self.step}: {name} loss is {out[name]}")
        self.step += 1
        return out

    @torch.no_grad()
    def validate(self) -> dict[str, float | None]:
        """IoU at p >= 0.5 per class over the fixed validation crops (pooled, not per crop)."""
        if self.val_batch is None:
            return {}
        x_all, t_all = self.val_batch
        bs = self.args.batch_size
        inter = np.zeros(len(self.classes))
        union = np.zeros(len(self.classes))
        for name, model in self.models.items():
            model.eval()
            chans = list(range(len(self.classes))) if name == SHARED else [self.classes.index(name)]
            for i in range(0, len(x_all), bs):
                with self._autocast():
                    p = model(x_all[i:i + bs].to(self.device)).float().cpu()
                pred = p >= 0.5
                tgt = t_all[i:i + bs][:, chans] >= 0.5
                inter[chans] += (pred & tgt).sum(dim=(0, 2, 3)).double().numpy()
                union[chans] += (pred | tgt).sum(dim=(0, 2, 3)).double().numpy()
        return {c: (float(inter[k] / union[k]) if union[k] > 0 else None) for k, c in enumerate(self.classes)}

    TIMING_WARMUP = 3      # steps not timed (CUDA/cuDNN start-up, allocator growth)
    TIMING_STEPS = 10      # steps timed before the first plan under --max-minutes

    def _plan(self, left_s: float, s_per_step: float) -> None:
        """Cut total_steps to what fits in left_s seconds (5% margin), never past --steps."""
        fit_steps = int(max(0.0, left_s) * 0.95 / max(s_per_step, 1e-9))
        planned = max(self.step + 1, min(self.args.steps, self.step + fit_steps))
        if planned != self.total_steps:
            self.log(f"time budget: {s_per_step:.3f} s/step, {left_s:.0f} s left -> {planned} steps "
                     f"(was {self.total_steps})")
            self.total_steps = planned

    def fit(self) -> None:
        a = self.args
        budget = a.max_minutes * 60 if a.max_minutes else None
        epoch_losses: dict[str, list[float]] = {}
        start = t0 = time.time()
        timed_from = timed_step = None     # start of the timed window (after TIMING_WARMUP steps)
        while self.step < self.total_steps:
            for k, v in self.train_step().items():
                epoch_losses.setdefault(k, []).append(v)
            if budget is not None:
                now = time.time()
                if timed_from is None and self.step >= self.TIMING_WARMUP:
                    timed_from, timed_step = now, self.step
                elif timed_from is not None and self.step == timed_step + self.TIMING_STEPS:
                    self._plan(budget - (now - start), (now - timed_from) / self.TIMING_STEPS)
            end = self.step % a.steps_per_epoch == 0 or self.step == self.total_steps
            if budget is not None and not end and time.time() - start >= budget:
                self.log(f"time budget of {a.max_minutes:g} min reached at step {self.step}")
                self.total_steps, end = self.step, True
            if end:
                val = self.validate()
                epoch = math.ceil(self.step / a.steps_per_epoch)
                losses = {k: float(np.mean(v)) for k, v in epoch_losses.items()}
                rec = {"epoch": epoch, "step": self.step, "loss": losses, "val_iou": val,
                       "lr": _lr(a, self.step - 1, self.total_steps), "seconds": round(time.time() - t0, 2)}
                self.history.append(rec)
                main = " ".join(f"{k}={v:.4f}" for k, v in losses.items() if not k.endswith(":balance"))
                bal = sum(v for k, v in losses.items() if k.endswith(":balance"))
                ious = " ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in val.items())
                self.log(f"epoch {epoch} step {self.step}/{self.total_steps} loss {main} (balance {bal:.4f}) "
                         f"val_iou {ious or '-'} lr {rec['lr']:.2e} {rec['seconds']:.1f}s")
                self.save()
                epoch_losses, t0 = {}, time.time()
                if budget is not None and timed_from is not None and self.step < self.total_steps:
                    # re-plan with the step time so far, validation and checkpoint writing included
                    now = time.time()
                    self._plan(budget - (now - start), (now - timed_from) / max(1, self.step - timed_step))

    # -------------------------------------------------------------- checkpoint

    def checkpoint(self) -> dict:
        a = self.args
        first = next(iter(self.models.values()))
        last_val = next((h["val_iou"] for h in reversed(self.history) if h["val_iou"]), {})
        return {
            "format": FORMAT,
            "backbone": a.backbone,
            "base_checkpoint": self.base_checkpoint,
            "mode": a.mode,
            "classes": self.classes,
            "config": {"rank": a.rank, "alpha": a.alpha, "input_mode": a.input_mode, "input_size": self.size,
                       "overlap": self.overlap, "intensity_window": {"mode": "percentile", "low": 0.5, "high": 99.5},
                       "batch_size": a.batch_size, "lr": a.lr, "weight_decay": a.weight_decay,
                       "steps": self.total_steps, "max_minutes": a.max_minutes, "seed": a.seed,
                       "amp": self.amp},
            "frozen": frozen_state(first) if self.base_checkpoint is None else None,
            "models": {n: trainable_state(m) for n, m in self.models.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "history": self.history,
            "metrics": {"val_iou": last_val, "step": self.step},
            "training_data": self.training_data,
            "versions": {"torch": torch.__version__},
        }

    def save(self) -> None:
        self._drain()    # the RNG state is read below; no crop may be drawn meanwhile
        save_atomic(self.checkpoint(), self.args.out)


def main(argv=None) -> Trainer:
    args = parse_args(argv)
    trainer = Trainer(args, log=lambda s: print(s, flush=True))
    trainer.fit()
    print(json.dumps({"checkpoint": str(args.out), "step": trainer.step,
                      "val_iou": trainer.history[-1]["val_iou"] if trainer.history else {}}))
    return trainer


if __name__ == "__main__":
    run_main(main)
