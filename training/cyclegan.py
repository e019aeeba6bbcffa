"""CycleGAN: unpaired simulated -> real XCT slice translation (paper section 2.1; Zhu et al. 2017).

    python -m training.cyclegan train --sim SIM_DIR [...] --real REAL [...] -o runs/cyclegan.pt \
        [--steps 20000 --steps-per-epoch 100 --batch-size 4 --crop 256 --max-minutes 30 --resume]
    python -m training.cyclegan translate runs/cyclegan.pt SIM_DIR OUT_DIR

Domains. A: slices of simulated volumes (SIM_DIR/image.tif, e.g. from `xctrt simulate`); B: slices
of unlabelled real scans (a folder with image.tif, or any image file). Each volume's grey values are
mapped to [-1, 1] from its own 0.5/99.5 percentiles (data.percentile_window, the runtime's window),
clipped; a sample is a random single-channel crop (default 256², edge-padded if the slice is
smaller) of a random slice, randomly flipped / rotated by 90°.

Networks (the paper's, i.e. the reference CycleGAN's): ResNet generator c7s1-64, d128, d256,
9 residual blocks, u128, u64, c7s1-1 with instance norm, reflection padding and tanh; 70×70
PatchGAN discriminator (C64-C128-C256-C512, LeakyReLU 0.2, instance norm but not on C64).
Losses: least-squares GAN, cycle L1 (λ = 10) and identity L1 (0.5·λ). Each discriminator sees a
fake drawn from a pool of the last 200 generated images (half the time an older one, once full).
Adam, lr 2e-4, β = (0.5, 0.999); the learning rate is constant for the first half of the run and
then decays linearly to 0 at the end of the last epoch (evaluated every step; the paper: 100 + 100
epochs). An "epoch" is --steps-per-epoch steps (crops are sampled, not enumerated); losses are
logged per epoch and the checkpoint is written atomically at every epoch end. AMP (bf16, fp16 with
a loss scaler) on CUDA. --max-minutes cuts the step count to what fits (the schedule still ends at
0); --resume continues from the checkpoint's step (the image pools are not saved: they refill).

translate applies G_A→B to every slice of SIM_DIR/image.tif, whole (the generator is fully
convolutional; slices are reflect-padded to a multiple of 4 and cropped back), maps [-1, 1] back to
grey values with the real domain's percentiles recorded in the checkpoint (the median over the
real volumes), in the real data's dtype (uint8 for ../shared/data/smg), and writes OUT_DIR/image.tif,
a byte copy of SIM_DIR/labels.tif and translate.json, renamed into place together at the end.

Defect survival (translate.json "defects"): CycleGANs are known to lose small features (paper
2.1). For every 26-connected labelled pore component P (xctrt._core.label_volume), its *shell* is
the material voxels (label 1) within `--shell` voxels (Chebyshev distance) of P. P is *visible* in a
grey volume when median(shell) - mean(P) > k · σ, with σ = 1.4826 · MAD(shell), the shell's robust
standard deviation (local noise and texture; at least half a grey level for integer images), k = --k
(default 2). Inclusions likewise, brighter:
mean(P) - median(shell) > k · σ. Components with fewer than 8 shell voxels are not scored.
recall_sim / recall_translated are the visible fractions in the simulated and translated images;
survival is the fraction of components visible in the simulation that are still visible after
translation.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import (StepBudget, autocast, image_path, load_checkpoint, pick_amp, pick_device, rng_state, run_main,
                     save_atomic, set_rng_state, setup_torch, source_window, split_verb)
from .data import percentile_window

FORMAT = "xctrt-cyclegan-ckpt/1"


# ---------------------------------------------------------------------- networks

class ResnetBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d2ngf, d4ngf, n_blocks × R4ngf, u2ngf, ungf, c7s1-out, tanh. Input side a multiple of 4."""

    def __init__(self, in_ch: int = 1, out_ch: int = 1, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        ch = ngf
        for _ in range(2):                                             # d128, d256
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [ResnetBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):                                             # u128, u64
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_ch, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """70×70 PatchGAN: C64 (no norm) - C128 - C256 (stride 2) - C512 (stride 1) - 1-channel map, 4×4 kernels."""

    def __init__(self, in_ch: int = 1, ndf: int = 64):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for stride in (2, 2, 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, stride, 1), nn.InstanceNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """N(0, 0.02) conv weights, zero biases (the reference implementation's 'normal' init)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class ImagePool:
    """History of generated images (Shrivastava et al.): until `size` images are stored each new one
    is stored and returned; after that, with probability 0.5 a random stored image is returned and
    replaced by the new one, else the new one is returned."""

    def __init__(self, size: int = 200):
        self.size, self.images = size, []

    def query(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.size <= 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif rng.random() < 0.5:
                k = int(rng.integers(self.size))
                out.append(self.images[k].clone())
                self.images[k] = img
            else:
                out.append(img)
        return torch.cat(out)


def lr_factor(step: int, total: int, decay_start: int) -> float:
    """1 until decay_start, then linear to 0 at step == total (the end of the last epoch)."""
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


# ---------------------------------------------------------------------- data

def scale_to_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Grey values -> [-1, 1] (lo -> -1, hi -> 1), clipped."""
    return np.clip((x.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo) * 2 - 1, -1, 1)


def unit_to_grey(y: np.ndarray, lo: float, hi: float, dtype) -> np.ndarray:
    g = (y.astype(np.float32) + 1) / 2 * np.float32(hi - lo) + np.float32(lo)
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.round(g), info.min, info.max).astype(dtype)
    return g.astype(dtype)


class DomainSlices:
    """Random crops of random slices of a domain's volumes, in [-1, 1]."""

    def __init__(self, paths, crop: int, augment: bool = True):
        import tifffile

        self.volumes, self.info = [], []
        for p in paths:
            f = image_path(p)
            vol = tifffile.imread(f)
            if vol.ndim == 2:
                vol = vol[None]
            if vol.ndim != 3:
                raise ValueError(f"{f}: expected a (Z, Y, X) volume or a 2D image, got shape {vol.shape}")
            lo, hi = percentile_window(vol)
            self.volumes.append((vol, lo, hi))
            self.info.append({"path": str(f.resolve()), "shape": list(vol.shape), "dtype": str(vol.dtype),
                              "window": [lo, hi]})
        if not self.volumes:
            raise ValueError("a domain needs at least one volume")
        self.crop, self.augment = crop, augment

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        vol, lo, hi = self.volumes[int(rng.integers(len(self.volumes)))]
        z = int(rng.integers(vol.shape[0]))
        h, w = vol.shape[1:]
        s = self.crop
        y0, x0 = int(rng.integers(max(1, h - s + 1))), int(rng.integers(max(1, w - s + 1)))
        img = vol[z, y0:y0 + s, x0:x0 + s]
        if img.shape != (s, s):
            img = np.pad(img, ((0, s - img.shape[0]), (0, s - img.shape[1])), mode="edge")
        img = scale_to_unit(img, lo, hi)
        if self.augment:
            if rng.random() < 0.5:
                img = img[:, ::-1]
            img = np.rot90(img, int(rng.integers(4)))
        return np.ascontiguousarray(img)

    def batch(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.sample(rng) for _ in range(n)])[:, None])


# ---------------------------------------------------------------------- training

def parse_train_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.cyclegan train",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Train a CycleGAN between simulated (A) and real (B) XCT slices.")
    ap.add_argument("--sim", nargs="+", required=True, help="domain A: simulated volume folders (image.tif)")
    ap.add_argument("--real", nargs="+", required=True, help="domain B: real volume folders or image files")
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/cyclegan.pt"))
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    ap.add_argument("--steps", type=int, default=20000, help="total steps (constant lr for the first half)")
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--decay-fraction", type=float, default=0.5, help="share of the run with linearly decaying lr")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--ndf", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=9, help="residual blocks in each generator")
    ap.add_argument("--lambda-cyc", type=float, default=10.0)
    ap.add_argument("--lambda-idt", type=float, default=0.5, help="identity weight, as a fraction of lambda-cyc")
    ap.add_argument("--pool-size", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta1", type=float, default=0.5)
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for this run's loop")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    return ap.parse_args(argv)


class CycleGANTrainer:
    ARCH_KEYS = ("ngf", "ndf", "blocks", "crop")

    def __init__(self, args: argparse.Namespace, log=print):
        self.args, self.log = args, log
        self.device, self.amp = setup_torch(args)
        ckpt = None
        if args.resume and args.out.is_file():
            ckpt = load_checkpoint(args.out, FORMAT, "CycleGAN")
            for k in self.ARCH_KEYS:
                if ckpt["config"][k] != getattr(args, k):
                    raise ValueError(f"{args.out}: cannot resume, its {k} is {ckpt['config'][k]}, not {getattr(args, k)}")
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self.data_a = DomainSlices(args.sim, args.crop)
        self.data_b = DomainSlices(args.real, args.crop)

        self.G_AB = init_weights(ResnetGenerator(ngf=args.ngf, n_blocks=args.blocks)).to(self.device)
        self.G_BA = init_weights(ResnetGenerator(ngf=args.ngf, n_blocks=args.blocks)).to(self.device)
        self.D_A = init_weights(PatchDiscriminator(ndf=args.ndf)).to(self.device)   # real A vs G_BA(B)
        self.D_B = init_weights(PatchDiscriminator(ndf=args.ndf)).to(self.device)   # real B vs G_AB(A)
        betas = (args.beta1, 0.999)
        self.opt_G = torch.optim.Adam(list(self.G_AB.parameters()) + list(self.G_BA.parameters()), args.lr, betas=betas)
        self.opt_D = torch.optim.Adam(list(self.D_A.parameters()) + list(self.D_B.parameters()), args.lr, betas=betas)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.pool_A, self.pool_B = ImagePool(args.pool_size), ImagePool(args.pool_size)
        self.step, self.history = 0, []
        if ckpt is not None:
            for name in ("G_AB", "G_BA", "D_A", "D_B"):
                getattr(self, name).load_state_dict(ckpt["nets"][name])
            self.opt_G.load_state_dict(ckpt["opt_G"])
            self.opt_D.load_state_dict(ckpt["opt_D"])
            if self.amp == "fp16" and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(self.rng, ckpt["rng"], self.device)
            self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
            log(f"resumed {args.out} at step {self.step}")
        self.total_steps = args.steps
        n_g = sum(p.numel() for p in self.G_AB.parameters())
        n_d = sum(p.numel() for p in self.D_A.parameters())
        log(f"CycleGAN: 2 generators x {n_g:,} + 2 discriminators x {n_d:,} parameters, {args.blocks} residual "
            f"blocks, crops {args.crop}², batch {args.batch_size}, device {self.device}, amp {self.amp}; "
            f"A: {len(self.data_a.volumes)} simulated volume(s), B: {len(self.data_b.volumes)} real volume(s)")

    def lr_at(self, step: int) -> float:
        decay_start = int(round(self.total_steps * (1 - self.args.decay_fraction)))
        return self.args.lr * lr_factor(step, self.total_steps, decay_start)

    @staticmethod
    def _requires_grad(nets, flag: bool) -> None:
        for n in nets:
            for p in n.parameters():
                p.requires_grad_(flag)

    def losses_G(self, real_A, real_B):
        """Generator losses and the fakes (for the discriminators)."""
        a = self.args
        mse, l1 = F.mse_loss, F.l1_loss
        fake_B = self.G_AB(real_A)
        rec_A = self.G_BA(fake_B)
        fake_A = self.G_BA(real_B)
        rec_B = self.G_AB(fake_A)
        pred_B, pred_A = self.D_B(fake_B), self.D_A(fake_A)
        terms = {
            "G_adv_AB": mse(pred_B.float(), torch.ones_like(pred_B, dtype=torch.float32)),
            "G_adv_BA": mse(pred_A.float(), torch.ones_like(pred_A, dtype=torch.float32)),
            "cyc_A": l1(rec_A.float(), real_A) * a.lambda_cyc,
            "cyc_B": l1(rec_B.float(), real_B) * a.lambda_cyc,
        }
        if a.lambda_idt > 0:
            terms["idt_A"] = l1(self.G_BA(real_A).float(), real_A) * a.lambda_cyc * a.lambda_idt
            terms["idt_B"] = l1(self.G_AB(real_B).float(), real_B) * a.lambda_cyc * a.lambda_idt
        return terms, fake_A.detach(), fake_B.detach()

    def loss_D(self, D, real, fake):
        pr, pf = D(real).float(), D(fake).float()
        return 0.5 * (F.mse_loss(pr, torch.ones_like(pr)) + F.mse_loss(pf, torch.zeros_like(pf)))

    def train_step(self) -> dict[str, float]:
        a = self.args
        lr = self.lr_at(self.step)
        for opt in (self.opt_G, self.opt_D):
            for g in opt.param_groups:
                g["lr"] = lr
        real_A = self.data_a.batch(self.rng, a.batch_size).to(self.device, non_blocking=True)
        real_B = self.data_b.batch(self.rng, a.batch_size).to(self.device, non_blocking=True)
        for n in (self.G_AB, self.G_BA, self.D_A, self.D_B):
            n.train()
        # generators (discriminators frozen)
        self._requires_grad([self.D_A, self.D_B], False)
        with autocast(self.device, self.amp):
            terms, fake_A, fake_B = self.losses_G(real_A, real_B)
        loss_G = sum(terms.values())
        self.opt_G.zero_grad(set_to_none=True)
        self.scaler.scale(loss_G).backward()
        self.scaler.step(self.opt_G)
        # discriminators, on pooled fakes
        self._requires_grad([self.D_A, self.D_B], True)
        fake_A = self.pool_A.query(fake_A, self.rng)
        fake_B = self.pool_B.query(fake_B, self.rng)
        with autocast(self.device, self.amp):
            d_A = self.loss_D(self.D_A, real_A, fake_A)
            d_B = self.loss_D(self.D_B, real_B, fake_B)
        self.opt_D.zero_grad(set_to_none=True)
        self.scaler.scale(d_A + d_B).backward()
        self.scaler.step(self.opt_D)
        self.scaler.update()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out.update(G=float(loss_G.detach()), D_A=float(d_A.detach()), D_B=float(d_B.detach()))
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"step {self.step}: non-finite loss {bad}")
        self.step += 1
        return out

    def fit(self) -> None:
        a = self.args
        budget = StepBudget(a.max_minutes, self.log)
        epoch_losses: dict[str, list[float]] = {}
        t0 = time.time()
        while self.step < self.total_steps:
            lr = self.lr_at(self.step)
            for k, v in self.train_step().items():
                epoch_losses.setdefault(k, []).append(v)
            end = self.step % a.steps_per_epoch == 0 or self.step == self.total_steps
            self.total_steps = budget.after_step(self.step, self.total_steps, a.steps, epoch_end=end)
            if budget.expired() and self.step < self.total_steps:
                self.log(f"time budget of {a.max_minutes:g} min reached at step {self.step}")
                self.total_steps, end = self.step, True
            end = end or self.step == self.total_steps
            if end:
                rec = {"epoch": math.ceil(self.step / a.steps_per_epoch), "step": self.step,
                       "loss": {k: float(np.mean(v)) for k, v in epoch_losses.items()}, "lr": lr,
                       "seconds": round(time.time() - t0, 2)}
                self.history.append(rec)
                self.log(f"epoch {rec['epoch']} step {self.step}/{self.total_steps} "
                         + " ".join(f"{k}={v:.4f}" for k, v in rec["loss"].items())
                         + f" lr {lr:.2e} {rec['seconds']:.1f}s")
                self.save()
                epoch_losses, t0 = {}, time.time()

    def checkpoint(self) -> dict:
        a = self.args
        lo = float(np.median([i["window"][0] for i in self.data_b.info]))
        hi = float(np.median([i["window"][1] for i in self.data_b.info]))
        return {
            "format": FORMAT,
            "config": {"ngf": a.ngf, "ndf": a.ndf, "blocks": a.blocks, "crop": a.crop, "batch_size": a.batch_size,
                       "lambda_cyc": a.lambda_cyc, "lambda_idt": a.lambda_idt, "pool_size": a.pool_size,
                       "lr": a.lr, "beta1": a.beta1, "steps": self.total_steps, "steps_per_epoch": a.steps_per_epoch,
                       "decay_fraction": a.decay_fraction, "max_minutes": a.max_minutes, "seed": a.seed,
                       "amp": self.amp},
            "nets": {n: {k: t.detach().cpu() for k, t in getattr(self, n).state_dict().items()}
                     for n in ("G_AB", "G_BA", "D_A", "D_B")},
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "rng": rng_state(self.rng, self.device), "history": self.history,
            "domains": {"A": self.data_a.info, "B": self.data_b.info},
            "real_window": [lo, hi], "real_dtype": self.data_b.info[0]["dtype"],
            "versions": {"torch": torch.__version__},
        }

    def save(self) -> None:
        save_atomic(self.checkpoint(), self.args.out)


# ---------------------------------------------------------------------- translation

def load_generator(ckpt: dict, name: str = "G_AB", device="cpu") -> ResnetGenerator:
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"not a CycleGAN checkpoint (format {ckpt.get('format')!r})")
    cfg = ckpt["config"]
    g = ResnetGenerator(ngf=cfg["ngf"], n_blocks=cfg["blocks"])
    g.load_state_dict(ckpt["nets"][name])
    return g.to(device).eval()


@torch.no_grad()
def translate_slices(gen: nn.Module, slices: np.ndarray, device, amp: str = "off") -> np.ndarray:
    """(n, H, W) in [-1, 1] -> (n, H, W) in [-1, 1]: whole slices, reflect-padded to a multiple of 4."""
    x = torch.from_numpy(np.ascontiguousarray(slices, np.float32))[:, None].to(device)
    h, w = x.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    with autocast(torch.device(device) if isinstance(device, str) else device, amp):
        y = gen(x).float()
    return y[:, 0, :h, :w].cpu().numpy()


def _shell_and_stats(grey: np.ndarray, comp: np.ndarray, shell_mask: np.ndarray):
    inside = grey[comp].astype(np.float64)
    ring = grey[shell_mask].astype(np.float64)
    med = float(np.median(ring))
    sigma = 1.4826 * float(np.median(np.abs(ring - med)))
    # integer grey values: at least half a grey level (a flat shell would otherwise make any step "visible")
    return float(inside.mean()), med, max(sigma, 0.5 if grey.dtype.kind in "ui" else 1e-12)


def defect_visibility(images: dict[str, np.ndarray], labels: np.ndarray, k: float = 2.0, shell: int = 2,
                      min_shell: int = 8, classes=(2, 3)) -> dict:
    """Per defect class: how many labelled components are visible (module docstring) in each image."""
    from xctrt import _core

    out = {"definition": f"visible: pore median(shell) - mean(pore) > k*sigma (inclusion: mean - median > k*sigma); "
                         f"shell = material voxels within {shell} voxels (Chebyshev) of the component; "
                         f"sigma = 1.4826*MAD(shell); components with < {min_shell} shell voxels not scored",
           "k": k, "shell_voxels": shell, "min_shell": min_shell}
    lab = np.ascontiguousarray(labels, np.uint8)
    Z, Y, X = lab.shape
    names = {2: "pore", 3: "inclusion"}
    for c in classes:
        ids = _core.label_volume(lab, [int(c)], 26)
        n = int(ids.max())
        flat = np.flatnonzero(ids)
        order = np.argsort(ids.ravel()[flat], kind="stable")
        flat = flat[order]
        starts = np.searchsorted(ids.ravel()[flat], np.arange(1, n + 2))
        visible = {name: 0 for name in images}
        both = scored = 0
        cnr = {name: [] for name in images}
        for i in range(n):
            zyx = np.unravel_index(flat[starts[i]:starts[i + 1]], lab.shape)
            lo = [max(0, int(a.min()) - shell) for a in zyx]
            hi = [min(s, int(a.max()) + shell + 1) for a, s in zip(zyx, (Z, Y, X))]
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            comp = ids[box] == i + 1
            grown = F.max_pool3d(torch.from_numpy(comp.astype(np.float32))[None, None], 2 * shell + 1, 1,
                                 shell)[0, 0].numpy() > 0
            ring = grown & (lab[box] == 1)
            if ring.sum() < min_shell:
                continue
            scored += 1
            vis = {}
            for name, img in images.items():
                mean_in, med, sigma = _shell_and_stats(img[box], comp, ring)
                contrast = (med - mean_in) if c == 2 else (mean_in - med)
                vis[name] = bool(contrast > k * sigma)
                visible[name] += vis[name]
                cnr[name].append(contrast / sigma)
            both += all(vis.values())
        rec = {"components": n, "scored": scored}
        for name in images:
            rec[f"visible_{name}"] = visible[name]
            rec[f"recall_{name}"] = visible[name] / scored if scored else None
            rec[f"median_cnr_{name}"] = float(np.median(cnr[name])) if cnr[name] else None
        first = next(iter(images))
        rec["survival"] = both / visible[first] if visible[first] else None
        out[names[int(c)]] = rec
    return out


def translate(ckpt_path, sim_dir, out_dir, device: str = "auto", batch: int = 4, amp: str = "auto",
              k: float = 2.0, shell: int = 2, log=print) -> dict:
    """Write OUT_DIR/image.tif (translated), labels.tif (byte copy) and translate.json, atomically."""
    from xctrt.io import StagedOutputs, open_volume, write_json, write_volume_tiff

    t0 = time.time()
    sim_dir, out_dir = Path(sim_dir), Path(out_dir)
    labels_src = sim_dir / "labels.tif"
    if not labels_src.is_file():
        raise FileNotFoundError(f"{labels_src} not found (translate needs a labelled simulated volume folder)")
    dev = pick_device(device)
    amp = pick_amp(dev, amp)
    ckpt = load_checkpoint(ckpt_path, FORMAT, "CycleGAN")
    gen = load_generator(ckpt, "G_AB", dev)
    lo_b, hi_b = ckpt["real_window"]
    out_dtype = np.dtype(ckpt.get("real_dtype", "uint8"))
    src = open_volume(image_path(sim_dir))
    try:
        lo_a, hi_a = source_window(src)
        Z = src.shape[0]
        sim = np.empty(src.shape, src.dtype)        # both held for the survival check (simulations are small)
        trans = np.empty(src.shape, out_dtype)

        def pages():
            for z0 in range(0, Z, batch):
                raw = src.read(z0, min(Z, z0 + batch))
                sim[z0:z0 + len(raw)] = raw
                y = translate_slices(gen, scale_to_unit(raw, lo_a, hi_a), dev, amp)
                g = unit_to_grey(y, lo_b, hi_b, out_dtype)
                trans[z0:z0 + len(g)] = g
                yield from g

        with StagedOutputs(out_dir, order=["labels.tif", "image.tif", "translate.json"], create=True) as staged:
            write_volume_tiff(staged.path("image.tif"), pages(), src.shape, out_dtype, src.voxel_size)
            shutil.copyfile(labels_src, staged.path("labels.tif"))
            import tifffile
            labels = tifffile.imread(labels_src)
            if labels.shape != src.shape:
                raise ValueError(f"{labels_src} shape {labels.shape} differs from the image {src.shape}")
            vis = defect_visibility({"sim": sim, "translated": trans}, labels, k=k, shell=shell)
            summary = {"checkpoint": str(Path(ckpt_path).resolve()), "sim_dir": str(sim_dir.resolve()),
                       "shape": list(src.shape), "sim_window": [lo_a, hi_a], "real_window": [lo_b, hi_b],
                       "dtype": str(out_dtype), "device": str(dev), "amp": amp,
                       "checkpoint_step": ckpt["step"], "defects": vis, "seconds": round(time.time() - t0, 2)}
            write_json(staged.path("translate.json"), summary)
    finally:
        src.close()
    for name in ("pore", "inclusion"):
        r = vis.get(name)
        if r:
            log(f"{name}s: {r['components']} components, {r['scored']} scored; visible in simulation "
                f"{r['visible_sim']} (recall {_f(r['recall_sim'])}), after translation {r['visible_translated']} "
                f"(recall {_f(r['recall_translated'])}), survival {_f(r['survival'])}")
    log(f"wrote {out_dir}/image.tif ({out_dtype}), labels.tif, translate.json in {time.time() - t0:.1f} s")
    return summary


def _f(v):
    return "-" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------------- command line

def main(argv=None):
    verb, rest = split_verb(argv, "training.cyclegan", ("train", "translate"))
    log = lambda s: print(s, flush=True)  # noqa: E731
    if verb == "train":
        args = parse_train_args(rest)
        tr = CycleGANTrainer(args, log=log)
        tr.fit()
        print(json.dumps({"checkpoint": str(args.out), "step": tr.step,
                          "loss": tr.history[-1]["loss"] if tr.history else {}}))
        return tr
    ap = argparse.ArgumentParser(prog="python -m training.cyclegan translate",
                                 description="Translate a simulated volume to the real domain with G_A->B.")
    ap.add_argument("checkpoint")
    ap.add_argument("sim_dir", help="folder with image.tif and labels.tif")
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=4, help="slices per forward pass")
    ap.add_argument("--k", type=float, default=2.0, help="visibility threshold in shell noise standard deviations")
    ap.add_argument("--shell", type=int, default=2, help="shell thickness in voxels")
    a = ap.parse_args(rest)
    return translate(a.checkpoint, a.sim_dir, a.out_dir, a.device, a.batch_size, a.amp, a.k, a.shell, log=log)


if __name__ == "__main__":
    run_main(main)
