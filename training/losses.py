"""Structure loss (weighted BCE + weighted IoU), as used for Conv-LoRA SAM fine-tuning.

Pixels whose 31×31 neighbourhood mean differs from their own label (near boundaries and around
small objects such as pores) get up to 6× the weight.

Difference from the reference implementation: it calls
``F.binary_cross_entropy_with_logits(pred, mask, reduce='none')``; `reduce` is the deprecated
boolean argument, 'none' is truthy, so it returns the plain *mean* BCE and the following
``(weit * wbce).sum() / weit.sum()`` multiplies a scalar by weights that cancel out: its BCE term is
silently unweighted. Here the BCE is weighted per pixel, as the formula intends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def boundary_weights(target: torch.Tensor) -> torch.Tensor:
    """w = 1 + 5·|avgpool31(g) − g| (zero padding counted in the mean, as in the reference)."""
    return 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)


def structure_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits, target: (N, K, H, W); target in [0, 1]. Per-(N, K) loss, averaged unless reduction='none'."""
    logits, target = logits.float(), target.float()
    w = boundary_weights(target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    wbce = (w * bce).sum(dim=(2, 3)) / w.sum(dim=(2, 3))
    p = torch.sigmoid(logits)
    inter = (w * p * target).sum(dim=(2, 3))
    union = (w * (p + target)).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    loss = wbce + wiou
    return loss if reduction == "none" else loss.mean()
