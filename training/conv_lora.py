"""Conv-LoRA: a low-rank adapter with a mixture of convolutional experts on SAM's qkv projections.

For a frozen fused projection qkv: C -> 3C applied to a block input x of shape (N, H, W, C):

    out = W0·x + b + s·B·(z + E_k(z)),   z = A·x,   s = alpha / r

A (r×C) and B (3C×r, zero-initialised, so training starts from the frozen model) are the LoRA
pair. E_k is one of 8 small conv experts applied to z laid out on its spatial grid (a 14×14
window in SAM's windowed blocks, the whole 64×64 grid in its global blocks; H, W are read from
the input). Expert i works at scale i: bicubic upsample by i, 3×3 conv, GELU, bicubic resize
back — so the experts see the low-rank features at different resolutions. A gate on the
globally pooled z picks one expert per sample (per window in windowed blocks).

Encoders whose attention takes token sequences (N, L, C) instead of SAM's (N, H, W, C) maps —
TinyViT (LiteMedSAM, MobileSAM) attends within ws×ws windows, L = ws² — give the wrapper a fixed
`grid` = (ws, ws); z is laid out on that window grid for the experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvExpert(nn.Module):
    """Expert at one scale: upsample by `scale` -> 3×3 conv r->r -> GELU -> resize back."""

    def __init__(self, rank: int, scale: int, device=None, dtype=None):
        super().__init__()
        self.scale = int(scale)
        self.conv = nn.Conv2d(rank, rank, 3, padding=1, device=device, dtype=dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, r, H, W) -> (N, r, H, W)
        h, w = z.shape[-2:]
        if self.scale > 1:
            z = F.interpolate(z, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
        z = F.gelu(self.conv(z))
        if self.scale > 1:
            z = F.interpolate(z, size=(h, w), mode="bicubic", align_corners=False)
        return z


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation (population variance / mean²): 0 when perfectly even."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


class ConvLoRAQKV(nn.Module):
    """Drop-in replacement for an encoder block's fused `attn.qkv` Linear.

    Input (N, H, W, C) (segment-anything's ViT), or (N, L, C) token windows when `grid` = (h, w)
    is given and L = h·w (TinyViT)."""

    def __init__(self, qkv: nn.Linear, rank: int = 3, alpha: float = 32.0, num_experts: int = 8,
                 noise_eps: float = 0.01, balance_weight: float = 0.01, grid: tuple[int, int] | None = None):
        super().__init__()
        dev, dt = qkv.weight.device, qkv.weight.dtype
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.qkv = qkv
        for p in self.qkv.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.num_experts = rank, float(alpha), num_experts
        self.scaling = self.alpha / rank
        self.noise_eps, self.balance_weight = noise_eps, balance_weight
        # nn.Linear's default (Kaiming-uniform) init for A, as LoRA does; B = 0 so the adapted
        # model starts out identical to the frozen one.
        self.lora_a = nn.Linear(qkv.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_b = nn.Linear(rank, qkv.out_features, bias=False, device=dev, dtype=dt)
        nn.init.zeros_(self.lora_b.weight)
        # Gate and noise projections start at zero (as in Shazeer et al.): routing starts uniform
        # and noise-driven, and the balancing loss shapes it from there.
        self.w_gate = nn.Parameter(torch.zeros(rank, num_experts, device=dev, dtype=dt))
        self.w_noise = nn.Parameter(torch.zeros(rank, num_experts, device=dev, dtype=dt))
        self.experts = nn.ModuleList(ConvExpert(rank, i + 1, device=dev, dtype=dt) for i in range(num_experts))
        self.merged = False          # export: A·x already folded into qkv.weight
        self.static_select = False   # export: evaluate all experts, pick with a one-hot (no data-dependent ops)
        self.balance_loss: torch.Tensor | None = None
        self.last_choice: torch.Tensor | None = None   # expert index per sample of the last forward (inspection)

    # ------------------------------------------------------------------ routing

    def _route(self, z: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """E_k(z) per sample, k = choice[n]. z: (N, r, H, W)."""
        if self.static_select:
            # Graph-friendly: every expert runs on every sample; a one-hot of the choice keeps one.
            onehot = (choice[:, None] == torch.arange(self.num_experts, device=z.device)).to(z.dtype)
            out = onehot[:, 0, None, None, None] * self.experts[0](z)
            for e in range(1, self.num_experts):
                out = out + onehot[:, e, None, None, None] * self.experts[e](z)
            return out
        # Training / eager eval: run each expert only on the samples routed to it.
        out = torch.zeros_like(z)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                out = out.index_copy(0, idx, expert(z.index_select(0, idx)).to(out.dtype))
        return out

    def _balance(self, clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor,
                 choice: torch.Tensor) -> torch.Tensor:
        """0.01·(cv²(importance) + cv²(load)).

        With top-1 the gate value of the chosen expert is softmax over one logit = 1, so
        importance (summed gate values) is the routed count and carries no gradient. Load uses the
        smooth noisy-top-k estimate of Shazeer et al. (2017): for each sample and expert, the
        probability, over a fresh draw of that expert's noise, that it would still be (or become)
        the top-1 given the other noisy logits. That makes the loss differentiable w.r.t. the gate
        and noise projections.
        """
        importance = F.one_hot(choice, self.num_experts).to(clean.dtype).sum(0)
        top2 = noisy.topk(min(2, self.num_experts), dim=1).values
        thr_if_in = top2[:, -1:]    # an expert currently in the top-1 must stay above the runner-up
        thr_if_out = top2[:, :1]    # any other expert must beat the current winner
        is_in = noisy > thr_if_in
        p_in = torch.special.ndtr((clean - thr_if_in) / std)
        p_out = torch.special.ndtr((clean - thr_if_out) / std)
        load = torch.where(is_in, p_in, p_out).sum(0)
        return self.balance_weight * (cv_squared(importance) + cv_squared(load))

    # ------------------------------------------------------------------ forward

    def _gate(self, zg: torch.Tensor) -> torch.Tensor:
        """Expert index per sample: noisy top-1 in training (and the balancing loss), plain top-1 in eval."""
        pooled = zg.mean(dim=(2, 3))                          # (N, r) global average pool
        clean = pooled @ self.w_gate.to(pooled.dtype)         # (N, E)
        if self.training:
            std = F.softplus(pooled @ self.w_noise.to(pooled.dtype)) + self.noise_eps
            noisy = clean + torch.randn_like(clean) * std
            choice = noisy.argmax(dim=1)
            self.balance_loss = self._balance(clean, noisy, std, choice)
        else:
            choice = clean.argmax(dim=1)
            self.balance_loss = None
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.dim() == 3 and self.grid is not None
        if not tokens and x.dim() != 4:
            raise ValueError(f"ConvLoRAQKV expects a (N, H, W, C) block input"
                             f"{' or (N, L, C) tokens (no grid set)' if self.grid is None else ''}, "
                             f"got shape {tuple(x.shape)}")
        if tokens and x.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"ConvLoRAQKV: {x.shape[1]} tokens do not fill its {self.grid[0]}×{self.grid[1]} grid")
        out = self.qkv(x)
        z = self.lora_a(x)                        # (N, H, W, r), or (N, L, r) tokens
        if tokens:
            z = z.reshape(-1, self.grid[0], self.grid[1], self.rank)
        zg = z.permute(0, 3, 1, 2)                # (N, r, H, W): the spatial grid the experts see
        if torch.is_autocast_enabled(x.device.type):
            # Routing and the balancing loss in fp32: bf16 logits would tie and blur the top-1.
            with torch.autocast(x.device.type, enabled=False):
                choice = self._gate(zg.float())
        else:
            choice = self._gate(zg)
        self.last_choice = choice.detach()
        moe = self._route(zg, choice).permute(0, 2, 3, 1)   # (N, H, W, r)
        branch = moe if self.merged else z + moe
        if tokens:
            branch = branch.reshape(x.shape[0], x.shape[1], self.rank)
        return out + self.scaling * self.lora_b(branch)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the linear part into the frozen weight: W0 <- W0 + s·B·A (call on a copy)."""
        if not self.merged:
            self.qkv.weight += self.scaling * (self.lora_b.weight @ self.lora_a.weight)
            self.merged = True


# ---------------------------------------------------------------------- applying it to SAM

def _decoders(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "mask_decoders"):
        return list(model.mask_decoders)
    return [model.mask_decoder]


@torch.no_grad()
def reduce_mask_decoder(dec: nn.Module) -> nn.Module:
    """Keep one mask token and one hypernetwork MLP (SAM's single-mask output, index 0).

    A stock checkpoint's decoder has 4 tokens (1 single-mask + 3 multimask); slicing keeps the
    pretrained single-mask path. The IoU head's last layer is cut to that one output too."""
    if dec.num_mask_tokens == 1:
        return dec
    old = dec.mask_tokens.weight
    dec.mask_tokens = nn.Embedding(1, old.shape[1], device=old.device, dtype=old.dtype)
    dec.mask_tokens.weight.copy_(old[:1])
    dec.output_hypernetworks_mlps = nn.ModuleList([dec.output_hypernetworks_mlps[0]])
    last = dec.iou_prediction_head.layers[-1]
    new = nn.Linear(last.in_features, 1, device=last.weight.device, dtype=last.weight.dtype)
    new.weight.copy_(last.weight[:1])
    new.bias.copy_(last.bias[:1])
    dec.iou_prediction_head.layers[-1] = new
    dec.num_multimask_outputs, dec.num_mask_tokens = 0, 1
    return dec


def attention_blocks(encoder: nn.Module) -> list[tuple[nn.Module, tuple[int, int] | None]]:
    """Every attention module with a fused `qkv` Linear in an image encoder, with the token grid its
    qkv sees: None for segment-anything's ImageEncoderViT (its blocks pass (N, H, W, C) maps, global
    or 14×14 windows), (ws, ws) for TinyViT (LiteMedSAM / MobileSAM), whose stages 1-3 attend within
    ws×ws windows of (N·windows, ws², C) tokens. TinyViT's stage 0 is convolutional (MBConv, no
    attention) and gets no adapter."""
    if hasattr(encoder, "blocks"):                       # segment-anything ImageEncoderViT
        return [(b.attn, None) for b in encoder.blocks]
    if hasattr(encoder, "layers"):                       # TinyViT: layers[i].blocks[j].attn
        found = []
        for layer in encoder.layers:
            for b in layer.blocks:
                attn = getattr(b, "attn", None)
                if attn is None:
                    continue                             # MBConv block
                ws = int(b.window_size)
                n = attn.attention_bias_idxs.shape[0]    # the attention's own window: ws² tokens
                if n != ws * ws:
                    raise ValueError(f"TinyViT block with window {ws} has attention over {n} tokens")
                found.append((attn, (ws, ws)))
        return found
    raise TypeError(f"no attention blocks found in {type(encoder).__name__} (expected segment-anything's "
                    f"ImageEncoderViT or TinyViT)")


def apply_conv_lora(sam: nn.Module, r: int = 3, alpha: float = 32.0, num_experts: int = 8) -> nn.Module:
    """Freeze `sam` (a segment-anything Sam, a LiteMedSAM or an XctSam), wrap every encoder attention
    block's qkv with Conv-LoRA, reduce the mask decoder(s) to one mask; trainable: adapters + decoder
    minus IoU head."""
    for p in sam.parameters():
        p.requires_grad_(False)
    for attn, grid in attention_blocks(sam.image_encoder):
        if not isinstance(attn.qkv, ConvLoRAQKV):
            attn.qkv = ConvLoRAQKV(attn.qkv, rank=r, alpha=alpha, num_experts=num_experts, grid=grid)
    for dec in _decoders(sam):
        reduce_mask_decoder(dec)
        for p in dec.parameters():
            p.requires_grad_(True)
        for p in dec.iou_prediction_head.parameters():
            p.requires_grad_(False)
    return sam


def conv_lora_modules(model: nn.Module) -> list[ConvLoRAQKV]:
    return [m for m in model.modules() if isinstance(m, ConvLoRAQKV)]


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the per-layer balancing losses of the last training forward (None when there are none)."""
    losses = [m.balance_loss for m in conv_lora_modules(model) if m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
