"""Small pieces shared by the CycleGAN and 2.5D U-Net trainers (cyclegan.py, unet25d.py).

device and mixed-precision choice, atomic checkpoint writes, a wall-clock step budget, the
runtime's percentile intensity window computed on a streamed volume, and staged-volume metadata
(`slices.json`: which slices form contiguous segments and which carry labels that count).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import percentile_window


# ---------------------------------------------------------------------- device, AMP, checkpoints

def pick_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def pick_amp(device: torch.device, amp: str = "auto") -> str:
    """off on CPU; on CUDA auto = bf16 where supported, else fp16."""
    if device.type != "cuda" or amp == "off":
        return "off"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"--amp must be auto, off, bf16 or fp16, not {amp!r}")
    return amp


def setup_torch(args) -> tuple[torch.device, str]:
    """Threads, device and mixed-precision mode from a trainer's --threads/--device/--amp."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    return device, pick_amp(device, args.amp)


def load_checkpoint(path: str | Path, fmt: str, what: str) -> dict:
    """One of our own checkpoints (full unpickling: we wrote it); ValueError for anything else."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path}: not a {what} checkpoint")
    return ckpt


def load_train_val(data, val_dirs, val_fraction: float, load, split) -> tuple[list, list]:
    """Training and validation volumes: explicit --val folders, else the last val_fraction of each
    training volume held out. `load`/`split` are the caller's volume reader and splitter."""
    train, val = [], []
    for d in data:
        v = load(d)
        if not val_dirs and val_fraction > 0:
            v, hv = split(v, val_fraction)
            val.append(hv)
        train.append(v)
    return train, val + [load(d) for d in val_dirs]


def autocast(device: torch.device, amp: str):
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")


def save_atomic(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(rng: np.random.Generator, device: torch.device) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(rng: np.random.Generator, state: dict, device: torch.device) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------- time budget

class StepBudget:
    """Fits a run into --max-minutes: after WARMUP untimed steps and TIMED timed ones, the total step
    count is cut to what the measured step time allows (5% margin, never above the requested count),
    and re-planned at every epoch end; `expired()` is the hard stop that guards the rest."""

    WARMUP = 3
    TIMED = 10

    def __init__(self, minutes: float | None, log=print):
        self.seconds = minutes * 60 if minutes else None
        self.start = time.time()
        self.log = log
        self._t0 = self._s0 = None

    def expired(self) -> bool:
        return self.seconds is not None and time.time() - self.start >= self.seconds

    def after_step(self, step: int, total: int, requested: int, epoch_end: bool = False) -> int:
        """Call after every optimiser step (step = steps done); returns the (possibly cut) total."""
        if self.seconds is None:
            return total
        now = time.time()
        if self._t0 is None:
            if self._s0 is None:
                self._s0 = step            # first step of this run: start counting warm-up steps
            if step - self._s0 >= self.WARMUP:
                self._t0, self._s0 = now, step
            return total
        if step - self._s0 == self.TIMED or (epoch_end and step > self._s0):
            per_step = (now - self._t0) / (step - self._s0)
            left = self.seconds - (now - self.start)
            fit = int(max(0.0, left) * 0.95 / max(per_step, 1e-9))
            planned = max(step, min(requested, step + fit))        # == step: no time for another step
            if planned != total:
                self.log(f"time budget: {per_step:.3f} s/step, {left:.0f} s left -> {planned} steps (was {total})")
            return planned
        return total


# ---------------------------------------------------------------------- volumes

def source_window(src, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """data.percentile_window of a streamed xctrt VolumeSource: the same 16 slices, read one by one."""
    z = src.shape[0]
    zs = np.unique(np.linspace(0, z - 1, min(16, z)).round().astype(int))
    sample = np.stack([src.read(int(k), int(k) + 1)[0] for k in zs])
    return percentile_window(sample, low, high)   # on len(zs) slices it picks all of them again


def image_path(p: str | Path) -> Path:
    """A volume folder (with image.tif) or an image file."""
    p = Path(p)
    return p / "image.tif" if p.is_dir() else p


def read_slices_json(folder: str | Path, depth: int) -> dict:
    """Segments and label targets of a volume folder.

    A staged volume (benchmarks/experiments_stage.py) may hold slices cut from several places of a
    source volume; its `slices.json` says {"segments": [[start, stop], ...]} (contiguous runs, in
    this volume's own slice numbers: 2.5D context never crosses a segment end) and {"targets":
    [z, ...]} (the slices whose labels are used for training and scoring; the others are context
    only). Without the file the whole volume is one segment and every slice is a target."""
    meta = {"segments": [[0, depth]], "targets": list(range(depth))}
    f = Path(folder) / "slices.json" if Path(folder).is_dir() else None
    if f is not None and f.is_file():
        got = json.loads(f.read_text())
        meta.update({k: got[k] for k in ("segments", "targets") if k in got})
        meta["source"] = got.get("source")
        meta["source_slices"] = got.get("source_slices")
    segs = [tuple(map(int, s)) for s in meta["segments"]]
    covered = np.zeros(depth, bool)
    for a, b in segs:
        if not 0 <= a < b <= depth or covered[a:b].any():
            raise ValueError(f"{folder}: slices.json segment [{a}, {b}) is outside [0, {depth}) or overlaps another")
        covered[a:b] = True
    if not covered.all():
        raise ValueError(f"{folder}: slices.json segments leave slices {np.flatnonzero(~covered)[:5]}... uncovered")
    targets = sorted(int(t) for t in meta["targets"])
    if any(not 0 <= t < depth for t in targets):
        raise ValueError(f"{folder}: slices.json target outside [0, {depth})")
    meta["segments"], meta["targets"] = [list(s) for s in segs], targets
    return meta


def segment_bounds(segments, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, the first and the last slice of its segment (int arrays of length depth)."""
    lo, hi = np.empty(depth, np.int64), np.empty(depth, np.int64)
    for a, b in segments:
        lo[a:b], hi[a:b] = a, b - 1
    return lo, hi


def split_verb(argv, prog: str, verbs: tuple[str, ...]) -> tuple[str, list[str]]:
    """`python -m PROG VERB ...`: the verb and its arguments (argv None: the command line), or the usage
    line and a non-zero exit when the verb is missing or unknown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in verbs:
        sys.exit(f"usage: python -m {prog} {{{','.join(verbs)}}} ... (--help after the verb)")
    return argv[0], argv[1:]


def run_main(main) -> None:
    """A training command's entry point: bad input (a wrong value, a missing file) ends in one
    `error: ...` line and a non-zero exit instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
