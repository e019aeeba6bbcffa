"""The GPU path: torch (CUDA, bf16) for the model, CuPy for the stages around it.

Imported only when a GPU run is asked for; the CPU runtime never needs torch, Triton or CuPy.

  attention.py   SAM attention with decomposed relative positions: reference, SDPA and a fused Triton kernel
  post.py        window / resize / aggregate / 3D components written once for NumPy and CuPy (exact to _core)
  sam.py         the prompt-free SAM segmenter and its fast bf16 forward (fused attention, CUDA graphs)
  pipeline.py    GPU segmentation: pinned host buffers, copy and compute streams, post-processing on device
  bench.py       naive / compiled / ours, stage by stage, for `xctrt bench --gpu`

The checks below import nothing heavy at module level, so a machine without torch or CuPy gets one
clear sentence instead of an import error from deep inside the GPU modules.
"""
from __future__ import annotations

from ..errors import XctrtError


def check_torch():
    """torch, or one clear sentence (the GPU path's code also runs on the host, for dry runs)."""
    try:
        import torch
    except ImportError as exc:
        raise XctrtError("the GPU path needs torch (pip install '.[gpu]')") from exc
    return torch


def check_cuda() -> None:
    """One clear sentence when the GPU path cannot run here (checked before any work starts)."""
    if not check_torch().cuda.is_available():
        raise XctrtError("the GPU path needs a CUDA device; torch sees none")
    cuda_array_module()


def cuda_array_module():
    try:
        import cupy
    except ImportError as exc:
        raise XctrtError("the GPU path needs CuPy for its stages (pip install '.[gpu]')") from exc
    return cupy
