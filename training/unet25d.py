"""2.5D U-Net baseline (paper section 4.1; Cheniour et al. 2024): 5 adjacent slices in, one slice out.

    python -m training.unet25d train --data ../shared/data/smg/train/pair_1 -o runs/unet.pt \
        [--steps 20000 --batch-size 16 --crop 256 --max-minutes 30 --resume]
    python -m training.unet25d train --data test5_ft --init runs/unet.pt --replay .../train/pair_1 \
        --replay-fraction 0.5 -o runs/unet_ft.pt          # re-fine-tuning, with replay of old data
    python -m training.unet25d predict runs/unet.pt VOLUME OUT_LABELS.tif [--every N]
        [--truth LABELS --truth-out TRUTH_SUBSET.tif]
    xctrt evaluate OUT_LABELS.tif LABELS

Input: slices z-2..z+2 as 5 channels, each volume windowed to [0, 1] exactly as the runtime windows
it (data.percentile_window); at a volume's first and last slices (and at the ends of the segments of
a staged volume, see common.read_slices_json) the missing neighbours replicate the edge slice.

Output: 4-class softmax (air, material, pore, inclusion). Why softmax and not 3 sigmoid heads: the
labels are mutually exclusive (every voxel has exactly one), argmax gives a label volume with no
thresholds or priority rule to tune, and the paper's weighted Dice is written over one probability
per class that sum to one.

Loss: the paper's weighted Dice, one ratio over all classes (generalised Dice):
    L = 1 - 2 Σ_c w_c Σ_i p_ci g_ci / Σ_c w_c Σ_i (p_ci + g_ci),  sums over the batch's pixels i,
with w_c inverse to class c's voxel frequency f_c in the training slices: w_c ∝ 1 / max(f_c, 1e-4),
capped at --weight-cap times the smallest weight (so a class of 0.03% cannot drown the rest: the paper
notes that raw frequency ratios trained poorly and tuned them by hand), normalised to sum 1;
--class-weights overrides them; --init keeps the initial checkpoint's weights (the same loss as the
first training). Recorded in the checkpoint.

Training: the same class-balanced crop sampler and augmentations as the SAM trainer (data.py:
CropSampler anchoring, geometric + intensity augmentation applied identically to the 5 channels),
Adam (lr 2e-4, the paper's), --workers processes to draw batches beside a GPU, fixed unaugmented validation crops scored every epoch by hard Dice per
class; the checkpoint keeps the last weights and the best (highest mean validation Dice over the
material and defect classes present; none without validation data, and predict then uses the last),
written atomically each epoch. AMP on CUDA, --resume,
--max-minutes. --init starts from another U-Net checkpoint's weights (a new optimiser: the paper's
re-fine-tuning); --replay mixes --replay-fraction of every batch from other volumes (the old training
data) to limit catastrophic forgetting.

predict writes a uint8 label volume (0..3) slab by slab (the whole slice at once, reflect-padded to
a multiple of 2^depth), so `xctrt evaluate` can score it. The model package format is single-slice
(N, 1, S, S), so this model has no package export.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import (StepBudget, autocast, image_path, load_checkpoint, load_train_val, pick_amp, pick_device,
                     read_slices_json, rng_state, run_main, save_atomic, segment_bounds, set_rng_state, setup_torch,
                     source_window, split_verb)
from .data import CropSampler, Volume, _window, load_volume, split_volume

FORMAT = "xctrt-unet25d-ckpt/1"
CLASSES = ["air", "material", "pore", "inclusion"]
CONTEXT = 5


# ---------------------------------------------------------------------- model

class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class UNet25D(nn.Module):
    """U-Net: `depth` 2× poolings, channels base·2^k, transposed-conv up-sampling, skip concatenation.
    (N, in_ch, H, W) -> logits (N, n_classes, H, W); H and W multiples of 2^depth."""

    def __init__(self, in_ch: int = CONTEXT, n_classes: int = 4, base: int = 32, depth: int = 4):
        super().__init__()
        self.depth = depth
        chans = [base * 2 ** k for k in range(depth + 1)]
        self.inc = DoubleConv(in_ch, chans[0])
        self.down = nn.ModuleList(DoubleConv(chans[k], chans[k + 1]) for k in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[k + 1], chans[k], 2, stride=2) for k in reversed(range(depth)))
        self.dec = nn.ModuleList(DoubleConv(2 * chans[k], chans[k]) for k in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], n_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for d in self.down:
            skips.append(d(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([skips.pop(), up(y)], 1))
        return self.head(y)


# ---------------------------------------------------------------------- loss

def inverse_frequency_weights(counts, floor: float = 1e-4, cap: float | None = 100.0) -> np.ndarray:
    """w_c ∝ 1 / max(f_c, floor), at most cap × min(w), normalised to sum 1."""
    counts = np.asarray(counts, np.float64)
    f = counts / max(counts.sum(), 1.0)
    w = 1.0 / np.maximum(f, floor)
    if cap is not None:
        w = np.minimum(w, cap * w.min())
    return (w / w.sum()).astype(np.float32)


def weighted_dice_loss(probs: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """1 - 2 Σ_c w_c Σ p·g / Σ_c w_c Σ (p + g); probs and one-hot target (N, C, H, W), weights (C,)."""
    probs, target = probs.float(), target.float()
    inter = (probs * target).sum(dim=(0, 2, 3))
    denom = (probs + target).sum(dim=(0, 2, 3))
    w = weights.to(probs.device, torch.float32)
    return 1 - (2 * (w * inter).sum() + eps) / ((w * denom).sum() + eps)


# ---------------------------------------------------------------------- data

def stack_indices(z: int, lo: int, hi: int, context: int = CONTEXT) -> np.ndarray:
    """Slices z-h..z+h (h = context // 2), clamped to [lo, hi]: edge slices replicate."""
    h = context // 2
    return np.clip(np.arange(z - h, z + h + 1), lo, hi)


def augment_stack(img: np.ndarray, tgt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """data.augment for a (C, S, S) image: the same random draws in the same order, the same geometry
    on every channel and the target, the same intensity jitter on every channel, independent noise.
    For C = 1 it returns exactly what data.augment returns for the 2D image."""
    if rng.random() < 0.5:
        img, tgt = img[..., ::-1], tgt[..., ::-1]
    if rng.random() < 0.5:
        img, tgt = img[..., ::-1, :], tgt[..., ::-1, :]
    k = int(rng.integers(4))
    img, tgt = np.rot90(img, k, axes=(-2, -1)), np.rot90(tgt, k, axes=(-2, -1))
    contrast, bright, gamma = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08), np.exp(rng.uniform(-0.25, 0.25))
    img = np.clip((img - 0.5) * contrast + 0.5 + bright, 0, 1) ** gamma
    if rng.random() < 0.7:
        img = img + rng.normal(0, rng.uniform(0.0, 0.05), img.shape)
    return np.clip(img, 0, 1).astype(np.float32), np.ascontiguousarray(tgt, dtype=np.float32)


def load_stack_volume(folder, z_range=None) -> Volume:
    """data.load_volume plus 2.5D metadata: per-slice segment bounds and the target-slice mask."""
    v = load_volume(folder, z_range)
    meta = read_slices_json(folder, v.image.shape[0])
    v.seg_lo, v.seg_hi = segment_bounds(meta["segments"], v.image.shape[0])
    v.targets = np.zeros(v.image.shape[0], bool)
    v.targets[meta["targets"]] = True
    return v


def split_stack_volume(v: Volume, val_fraction: float) -> tuple[Volume, Volume]:
    tr, va = split_volume(v, val_fraction)
    for part in (tr, va):
        part.seg_lo, part.seg_hi, part.targets = v.seg_lo, v.seg_hi, v.targets
    return tr, va


def index_targets(v: Volume, class_ids, rng: np.random.Generator) -> None:
    """Volume.index_points restricted to target slices (labels of other slices are not used)."""
    v.index_points(class_ids, rng)
    v.points = {c: p[v.targets[p[:, 0]]] for c, p in v.points.items()}
    z0, z1 = v.z_range
    v.anchor_slices = np.flatnonzero(v.targets[z0:z1]) + z0


def class_counts(volumes) -> np.ndarray:
    """Voxels per class over the target slices in each volume's z range."""
    counts = np.zeros(4, np.int64)
    for v in volumes:
        for z in v.anchor_slices:
            counts += np.bincount(v.labels[z].ravel(), minlength=4)[:4]
    return counts


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless batches from draw(rng), one generator per DataLoader worker."""

    def __init__(self, draw, seed):
        super().__init__()
        self.draw, self.seed = draw, list(seed)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(self.seed + [info.id if info is not None else 0])
        while True:
            yield self.draw(rng)


class StackCropSampler(CropSampler):
    """CropSampler (class-balanced anchors, tile crops, edge padding) on 5-slice stacks; targets are
    one-hot over the 4 classes; anchors lie on target slices only."""

    def __init__(self, volumes, size: int, positive_fraction: float = 0.5, augment: bool = True,
                 context: int = CONTEXT):
        super().__init__(volumes, size, "tile", [0, 1, 2, 3], positive_fraction, augment)
        self.context = context
        self.volumes = [v for v in volumes if len(v.anchor_slices)]
        if not self.volumes:
            raise ValueError("no target slices to sample from")

    def _anchor(self, rng, focus):
        if focus is not None:
            cands = [v for v in self.volumes if len(v.points.get(focus, ()))]
            if cands:
                return super()._anchor(rng, focus)
        v = self.volumes[int(rng.integers(len(self.volumes)))]
        _, h, w = v.image.shape
        return v, int(v.anchor_slices[int(rng.integers(len(v.anchor_slices)))]), int(rng.integers(h)), int(rng.integers(w))

    def sample(self, rng, focus=None):
        v, z, y, x = self._anchor(rng, focus)
        s = self.size
        h, w = v.image.shape[1:]
        y0 = int(np.clip(y - rng.integers(s), 0, max(0, h - s)))
        x0 = int(np.clip(x - rng.integers(s), 0, max(0, w - s)))
        zs = stack_indices(z, v.seg_lo[z], v.seg_hi[z], self.context)
        img = v.image[zs, y0:y0 + s, x0:x0 + s]
        lab = v.labels[z, y0:y0 + s, x0:x0 + s]
        ph, pw = s - img.shape[1], s - img.shape[2]
        if ph or pw:
            img = np.pad(img, ((0, 0), (0, ph), (0, pw)), mode="edge")
            lab = np.pad(lab, ((0, ph), (0, pw)), mode="edge")
        image = _window(img, *v.window)
        tgt = np.stack([lab == c for c in self.class_ids]).astype(np.float32)
        if self.do_augment:
            image, tgt = augment_stack(image, tgt, rng)
        return image, tgt

    def batch(self, rng, n, focus_choices):
        x, t = super().batch(rng, n, focus_choices)
        return x[:, 0], t     # CropSampler adds a channel axis for 2D images; ours already has C


# ---------------------------------------------------------------------- training

def parse_train_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.unet25d train",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Train the 2.5D U-Net baseline on labelled volumes.")
    ap.add_argument("--data", nargs="+", required=True, help="volume folders (image.tif, labels.tif[, slices.json])")
    ap.add_argument("--val", nargs="*", default=[], help="validation volume folders (default: hold out the last "
                                                         "--val-fraction of each training volume)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--val-crops", type=int, default=32)
    ap.add_argument("--replay", nargs="*", default=[], help="volumes mixed into every batch (old training data)")
    ap.add_argument("--replay-fraction", type=float, default=0.5)
    ap.add_argument("--init", type=Path, default=None, help="start from this U-Net checkpoint's weights (fine-tuning)")
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/unet25d.pt"))
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    ap.add_argument("--base", type=int, default=32, help="channels at full resolution")
    ap.add_argument("--depth", type=int, default=4, help="poolings")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--positive-fraction", type=float, default=0.5, help="share of crops anchored on a class voxel")
    ap.add_argument("--weight-cap", type=float, default=100.0, help="largest class weight / smallest")
    ap.add_argument("--class-weights", default=None, help="4 comma-separated weights (air,material,pore,inclusion)")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="processes drawing training batches (0: in this one)")
    return ap.parse_args(argv)


def build_model(cfg: dict) -> UNet25D:
    return UNet25D(cfg["context"], len(CLASSES), cfg["base"], cfg["depth"])


def load_model(ckpt: dict, which: str = "best", device="cpu") -> UNet25D:
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"not a 2.5D U-Net checkpoint (format {ckpt.get('format')!r})")
    m = build_model(ckpt["config"])
    state = ckpt["best"]["model"] if which == "best" and ckpt.get("best") else ckpt["model"]
    m.load_state_dict(state)
    return m.to(device).eval()


class UNetTrainer:
    def __init__(self, args: argparse.Namespace, log=print):
        self.args, self.log = args, log
        self.device, self.amp = setup_torch(args)
        ckpt = None
        if args.resume and args.out.is_file():
            ckpt = load_checkpoint(args.out, FORMAT, "2.5D U-Net")
        init = load_checkpoint(args.init, FORMAT, "2.5D U-Net") if args.init and ckpt is None else None
        src_cfg = (ckpt or init or {}).get("config")
        self.cfg = {"context": CONTEXT, "base": args.base, "depth": args.depth}
        if src_cfg:
            self.cfg.update({k: src_cfg[k] for k in ("context", "base", "depth")})
        self.init_weights = init.get("class_weights") if init is not None else None
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self._load_data()

        self.model = build_model(self.cfg).to(self.device)
        self.init_from = None
        if init is not None:
            self.model.load_state_dict(init["best"]["model"] if init.get("best") else init["model"])
            self.init_from = str(Path(args.init).resolve())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.step, self.history, self.best = 0, [], None
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.amp == "fp16" and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(self.rng, ckpt["rng"], self.device)
            self.step, self.history, self.best = int(ckpt["step"]), list(ckpt["history"]), ckpt.get("best")
            self.weights = np.asarray(ckpt["class_weights"], np.float32)
            self.init_from = ckpt.get("init_from")
            log(f"resumed {args.out} at step {self.step}")
        self.weights_t = torch.from_numpy(self.weights)
        self.total_steps = args.steps
        self._stream = None
        log(f"2.5D U-Net base {self.cfg['base']} depth {self.cfg['depth']}: "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters, crops {args.crop}², batch "
            f"{args.batch_size}, device {self.device}, amp {self.amp}; class weights "
            + ", ".join(f"{c} {w:.4f}" for c, w in zip(CLASSES, self.weights))
            + (f"; init {args.init}" if init is not None else "")
            + (f"; replay {args.replay_fraction:.0%} from {len(self.replay_volumes)} volume(s)" if self.replay else ""))

    def _load_data(self) -> None:
        a = self.args
        train, val = load_train_val(a.data, a.val, a.val_fraction, load_stack_volume, split_stack_volume)
        replay = [load_stack_volume(d) for d in a.replay]
        for v in train + val + replay:
            index_targets(v, [1, 2, 3], self.rng)
        self.train_volumes, self.val_volumes, self.replay_volumes = train, val, replay
        self.counts = class_counts(train + replay)
        if a.class_weights:
            w = np.array([float(x) for x in a.class_weights.split(",")], np.float32)
            if w.shape != (4,) or (w < 0).any():
                raise ValueError("--class-weights takes 4 non-negative numbers")
            self.weights = w / w.sum()
        elif self.init_weights is not None:    # fine-tuning keeps the loss the model was trained with
            self.weights = np.asarray(self.init_weights, np.float32)
        else:
            self.weights = inverse_frequency_weights(self.counts, cap=a.weight_cap)
        self.sampler = StackCropSampler(train, a.crop, a.positive_fraction, context=self.cfg["context"])
        self.replay = (StackCropSampler(replay, a.crop, a.positive_fraction, context=self.cfg["context"])
                       if replay and a.replay_fraction > 0 else None)
        self.val_batch = None
        vv = [v for v in val if len(v.anchor_slices)]
        if vv and a.val_crops > 0:
            vs = StackCropSampler(vv, a.crop, 0.5, augment=False, context=self.cfg["context"])
            self.val_batch = vs.batch(np.random.default_rng(a.seed + 1), a.val_crops, [1, 2, 3])
        self.training_data = [f"{Path(d).resolve()} z[{v.z_range[0]}:{v.z_range[1]}] ({len(v.anchor_slices)} target slices)"
                              for d, v in zip(a.data, train)]

    def draw_batch(self, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        rng = self.rng if rng is None else rng
        n_rep = int(round(a.batch_size * a.replay_fraction)) if self.replay is not None else 0
        x, t = self.sampler.batch(rng, a.batch_size - n_rep, [1, 2, 3])
        if n_rep:
            xr, tr = self.replay.batch(rng, n_rep, [1, 2, 3])
            x, t = torch.cat([x, xr]), torch.cat([t, tr])
        return x, t

    def _batches(self):
        """Training batches: drawn here with the trainer's generator (--workers 0, reproducible and
        resumable bit for bit), or by --workers forked processes, each with its own generator seeded by
        (seed, step at start, worker), so a GPU is not left waiting on crop sampling and augmentation."""
        if self.args.workers <= 0:
            while True:
                yield self.draw_batch()
        import multiprocessing as mp
        # fork: the workers share the loaded volumes and need not pickle the trainer (which holds the model)
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        loader = torch.utils.data.DataLoader(_BatchStream(self.draw_batch, [self.args.seed, self.step]),
                                             batch_size=None, num_workers=self.args.workers, prefetch_factor=4,
                                             pin_memory=self.device.type == "cuda", multiprocessing_context=ctx)
        yield from loader

    def step_on(self, x: torch.Tensor, t: torch.Tensor) -> float:
        """One optimiser step on a given batch; returns its loss."""
        x, t = x.to(self.device, non_blocking=True), t.to(self.device, non_blocking=True)
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = self.args.lr
        with autocast(self.device, self.amp):
            logits = self.model(x)
        loss = weighted_dice_loss(torch.softmax(logits.float(), 1), t, self.weights_t)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        v = float(loss.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"step {self.step}: loss is {v}")
        self.step += 1
        return v

    def train_step(self) -> float:
        if self._stream is None:
            self._stream = self._batches()
        return self.step_on(*next(self._stream))

    @torch.no_grad()
    def validate(self) -> dict:
        """Weighted Dice loss and hard Dice per class over the fixed validation crops (pooled)."""
        if self.val_batch is None:
            return {}
        x_all, t_all = self.val_batch
        self.model.eval()
        inter, total, losses = np.zeros(4), np.zeros(4), []
        bs = self.args.batch_size
        for i in range(0, len(x_all), bs):
            with autocast(self.device, self.amp):
                logits = self.model(x_all[i:i + bs].to(self.device)).float()
            t = t_all[i:i + bs].to(self.device)
            losses.append(float(weighted_dice_loss(torch.softmax(logits, 1), t, self.weights_t)) * len(t))
            pred = F.one_hot(logits.argmax(1), 4).permute(0, 3, 1, 2).float()
            inter += (pred * t).sum(dim=(0, 2, 3)).double().cpu().numpy()
            total += (pred + t).sum(dim=(0, 2, 3)).double().cpu().numpy()
        dice = {c: (float(2 * inter[k] / total[k]) if total[k] > 0 else None) for k, c in enumerate(CLASSES)}
        scored = [dice[c] for c in CLASSES[1:] if dice[c] is not None]
        return {"loss": sum(losses) / len(x_all), "dice": dice,
                "mean_dice": float(np.mean(scored)) if scored else None}

    def fit(self) -> None:
        a = self.args
        budget = StepBudget(a.max_minutes, self.log)
        losses, t0 = [], time.time()
        while self.step < self.total_steps:
            losses.append(self.train_step())
            end = self.step % a.steps_per_epoch == 0 or self.step == self.total_steps
            self.total_steps = budget.after_step(self.step, self.total_steps, a.steps, epoch_end=end)
            if budget.expired() and self.step < self.total_steps:
                self.log(f"time budget of {a.max_minutes:g} min reached at step {self.step}")
                self.total_steps, end = self.step, True
            end = end or self.step == self.total_steps
            if end:
                val = self.validate()
                rec = {"epoch": math.ceil(self.step / a.steps_per_epoch), "step": self.step,
                       "loss": float(np.mean(losses)), "val": val, "seconds": round(time.time() - t0, 2)}
                self.history.append(rec)
                md = val.get("mean_dice")
                if md is not None and (self.best is None or md > self.best["mean_dice"]):
                    self.best = {"step": self.step, "mean_dice": md,
                                 "model": {k: t.detach().cpu().clone() for k, t in self.model.state_dict().items()}}
                dice = " ".join(f"{c}={'-' if v is None else f'{v:.3f}'}" for c, v in val.get("dice", {}).items())
                self.log(f"epoch {rec['epoch']} step {self.step}/{self.total_steps} loss {rec['loss']:.4f} "
                         + (f"val loss {val['loss']:.4f} dice {dice} " if val else "") + f"{rec['seconds']:.1f}s")
                self.save()
                losses, t0 = [], time.time()

    def checkpoint(self) -> dict:
        a = self.args
        return {
            "format": FORMAT, "classes": CLASSES,
            "config": {**self.cfg, "crop": a.crop, "batch_size": a.batch_size, "lr": a.lr, "steps": self.total_steps,
                       "positive_fraction": a.positive_fraction, "weight_cap": a.weight_cap, "amp": self.amp,
                       "replay_fraction": a.replay_fraction if self.replay is not None else 0.0,
                       "max_minutes": a.max_minutes, "seed": a.seed,
                       "intensity_window": {"mode": "percentile", "low": 0.5, "high": 99.5}},
            "class_weights": [float(w) for w in self.weights], "class_counts": [int(c) for c in self.counts],
            "model": {k: t.detach().cpu() for k, t in self.model.state_dict().items()},
            "best": self.best, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "rng": rng_state(self.rng, self.device), "history": self.history,
            "init_from": self.init_from, "training_data": self.training_data,
            "replay_data": [str(Path(d).resolve()) for d in a.replay],
            "versions": {"torch": torch.__version__},
        }

    def save(self) -> None:
        save_atomic(self.checkpoint(), self.args.out)


# ---------------------------------------------------------------------- prediction

def target_slices(volume, depth: int, every: int = 1) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(targets[::every], segment lo, segment hi) of a volume: a folder (or its image.tif) may hold
    slices.json; a plain image file is one segment whose slices are all targets."""
    p = Path(volume)
    folder = p if p.is_dir() else p.parent if p.name == "image.tif" else None
    meta = read_slices_json(folder, depth) if folder is not None else {"segments": [[0, depth]],
                                                                        "targets": list(range(depth))}
    lo, hi = segment_bounds(meta["segments"], depth)
    return meta["targets"][::max(1, every)], lo, hi


@torch.no_grad()
def predict_stacks(model: UNet25D, stacks: np.ndarray, device, amp: str = "off") -> np.ndarray:
    """(n, C, H, W) windowed stacks -> (n, H, W) uint8 labels (argmax), reflect-padded to 2^depth."""
    x = torch.from_numpy(np.ascontiguousarray(stacks, np.float32)).to(device)
    h, w = x.shape[-2:]
    m = 2 ** model.depth
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
    with autocast(device, amp):
        logits = model(x)
    return logits.float()[:, :, :h, :w].argmax(1).to(torch.uint8).cpu().numpy()


def predict(ckpt_path, volume, out_path, every: int = 1, truth=None, truth_out=None, which: str = "best",
            device: str = "auto", batch: int = 4, amp: str = "auto", log=print) -> dict:
    """Write OUT (uint8 labels of the target slices, [::every]) and optionally the truth's same slices."""
    from xctrt.io import StagedOutputs, open_volume, write_volume_tiff

    t0 = time.time()
    dev = pick_device(device)
    amp = pick_amp(dev, amp)
    ckpt = load_checkpoint(ckpt_path, FORMAT, "2.5D U-Net")
    model = load_model(ckpt, which, dev)
    ctx = ckpt["config"]["context"]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    src = open_volume(image_path(volume))
    try:
        Z, Y, X = src.shape
        targets, seg_lo, seg_hi = target_slices(volume, Z, every)
        lo, hi = source_window(src)
        cache: dict[int, np.ndarray] = {}

        def slice_at(z):
            if z not in cache:
                if len(cache) > 4 * batch + 2 * ctx:
                    for k in sorted(cache)[:len(cache) // 2]:
                        del cache[k]
                cache[z] = _window(src.read(int(z), int(z) + 1)[0], lo, hi)
            return cache[z]

        def pages():
            for i in range(0, len(targets), batch):
                zs = targets[i:i + batch]
                stacks = np.stack([np.stack([slice_at(int(k)) for k in stack_indices(z, seg_lo[z], seg_hi[z], ctx)])
                                   for z in zs])
                yield from predict_stacks(model, stacks, dev, amp)

        shape = (len(targets), Y, X)
        if truth is not None and truth_out is not None:
            truth_out = Path(truth_out)
            truth_out.parent.mkdir(parents=True, exist_ok=True)
            tsrc = open_volume(truth)
            try:
                if tsrc.shape != src.shape:
                    raise ValueError(f"{truth}: shape {tsrc.shape} differs from the image {src.shape}")
                with StagedOutputs(truth_out.parent) as staged:
                    write_volume_tiff(staged.path(truth_out.name), (tsrc.read(z, z + 1)[0].astype(np.uint8)
                                                                     for z in targets), shape, np.uint8, src.voxel_size)
            finally:
                tsrc.close()
        with StagedOutputs(out_path.parent) as staged:
            write_volume_tiff(staged.path(out_path.name), pages(), shape, np.uint8, src.voxel_size)
    finally:
        src.close()
    res = {"labels": str(out_path), "slices": len(targets), "of": Z, "every": every, "targets": targets,
           "window": [lo, hi], "weights": which if ckpt.get("best") else "last", "device": str(dev),
           "seconds": round(time.time() - t0, 2)}
    log(f"wrote {out_path} ({len(targets)} of {Z} slices, uint8 labels) in {res['seconds']:.1f} s")
    return res


# ---------------------------------------------------------------------- command line

def main(argv=None):
    verb, rest = split_verb(argv, "training.unet25d", ("train", "predict"))
    log = lambda s: print(s, flush=True)  # noqa: E731
    if verb == "train":
        args = parse_train_args(rest)
        tr = UNetTrainer(args, log=log)
        tr.fit()
        print(json.dumps({"checkpoint": str(args.out), "step": tr.step,
                          "best": {"step": tr.best["step"], "mean_dice": tr.best["mean_dice"]} if tr.best else None}))
        return tr
    ap = argparse.ArgumentParser(prog="python -m training.unet25d predict",
                                 description="Segment a volume with a 2.5D U-Net checkpoint into a uint8 label volume.")
    ap.add_argument("checkpoint")
    ap.add_argument("volume", help="image file or volume folder (image.tif[, slices.json: only its target slices])")
    ap.add_argument("out", help="label volume to write (.tif)")
    ap.add_argument("--every", type=int, default=1, help="predict every N-th target slice only")
    ap.add_argument("--truth", help="labels of the volume: write its same slices to --truth-out (for xctrt evaluate)")
    ap.add_argument("--truth-out")
    ap.add_argument("--weights", choices=("best", "last"), default="best")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args(rest)
    if (a.truth is None) != (a.truth_out is None):
        ap.error("--truth and --truth-out go together")
    return predict(a.checkpoint, a.volume, a.out, a.every, a.truth, a.truth_out, a.weights, a.device,
                   a.batch_size, a.amp, log=log)


if __name__ == "__main__":
    run_main(main)
