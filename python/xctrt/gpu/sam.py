"""XctSam: SAM as a prompt-free per-class segmenter, and its fast bf16 forward for GPUs.

image (N, 1, S, S) float32 in [0, 1]  ->  probabilities (N, K, S, S), one channel per decoder head.
S is the encoder's input size (its absolute position embedding fixes it). One head = the paper's
binary model for one class; several heads over one encoder = our shared-encoder mode.

Training (training/sam_model.py) builds these from backbones; the runtime's GPU path runs them.
Input scaling follows each backbone's own preprocessing: segment-anything models see
(255·x − pixel_mean) / pixel_std; LiteMedSAM sees x itself, grey replicated to 3 channels in both.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

PIXEL_MEAN = (123.675, 116.28, 103.53)   # SAM's normalisation, on the 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)


class XctSam(nn.Module):
    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 num_heads: int = 1, input_norm: str = "sam"):
        super().__init__()
        if input_norm not in ("sam", "unit"):
            raise ValueError(f"input_norm must be 'sam' (SAM pixel mean/std) or 'unit' ([0, 1] as is), not {input_norm!r}")
        self.input_norm = input_norm
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        # Head 0 is the given decoder; further heads start as copies of it (same pretrained start).
        self.mask_decoders = nn.ModuleList([mask_decoder] + [copy.deepcopy(mask_decoder)
                                                             for _ in range(num_heads - 1)])
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_sam(cls, sam: nn.Module, num_heads: int = 1) -> XctSam:
        """From a segment-anything Sam or a LiteMedSAM (whose builder marks it `xct_input_norm = "unit"`)."""
        return cls(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, num_heads,
                   input_norm=getattr(sam, "xct_input_norm", "sam"))

    def train(self, mode: bool = True) -> XctSam:
        """As nn.Module.train, but frozen BatchNorm layers (TinyViT's Conv2d_BN) stay in eval mode: a
        frozen backbone keeps its running statistics, in training steps too, and they never change."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.img_size)

    @property
    def num_heads(self) -> int:
        return len(self.mask_decoders)

    def _decode(self, dec: nn.Module, src: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """One decoder head without prompts -> low-res mask logits (N, 1, 4h, 4w), from the image
        embedding plus the no-mask embedding src and the positional encoding pe, both channels-last
        (N or 1, h, w, c).

        Written out instead of calling MaskDecoder.forward, whose repeat_interleave assumes one
        image and many prompts; here it is many images and no prompt (empty sparse embeddings).
        Channels-last throughout: the two-way transformer reads the image as (N, hw, c) tokens, and
        its tokens come back that way, so the NCHW tensors it and the upscaling are given are views
        of channels-last storage; no layout copy between them."""
        n, h, w, c = src.shape
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(n, -1, -1)
        hs, out = dec.transformer(src.permute(0, 3, 1, 2), pe.permute(0, 3, 1, 2), tokens)   # pe broadcasts over N
        mask_token = hs[:, 1, :]                               # the single-mask token
        hyper = dec.output_hypernetworks_mlps[0](mask_token)   # (N, c/8)
        fused = _fused_upscaling(dec.output_upscaling, out)
        if fused is not None:   # the upscaling's convs as GEMMs, the rest read from their rows (layout)
            from . import layout
            return layout.upscale_logits(out.view(n, h, w, c), *fused, hyper)
        up = dec.output_upscaling(out.view(n, h, w, c).permute(0, 3, 1, 2))
        _, cu, hu, wu = up.shape
        if up.is_contiguous(memory_format=torch.channels_last):   # (N, hu*wu, cu) rows: no copy
            return (up.permute(0, 2, 3, 1).reshape(n, hu * wu, cu) @ hyper.unsqueeze(-1)).view(n, 1, hu, wu)
        return (hyper.unsqueeze(1) @ up.reshape(n, cu, hu * wu)).reshape(n, 1, hu, wu)

    def decoder_inputs(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, pe) for _decode from an image embedding (N, c, h, w): the embedding plus the no-mask
        embedding and the positional encoding, channels-last, made once for all heads."""
        pe = self.prompt_encoder.get_dense_pe().to(emb.dtype)   # made in float32 (see ClassNet.cast_weights)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, 1, 1, -1)
        src = emb.permute(0, 2, 3, 1) + dense                 # (N, h, w, c), contiguous
        return src, pe.permute(0, 2, 3, 1).contiguous()

    def low_res_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Image embedding (N, c, h, w) -> mask logits (N, K, 4h, 4w), one channel per head."""
        src, pe = self.decoder_inputs(emb)
        return torch.cat([self._decode(d, src, pe) for d in self.mask_decoders], dim=1)

    def decode(self, emb: torch.Tensor, size: int) -> torch.Tensor:
        """Image embedding -> mask logits (N, K, size, size), one channel per head."""
        return upsample_logits(self.low_res_logits(emb), size)

    def prepare(self, image: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, 1, S, S) in [0, 1] -> the backbone's 3-channel input, computed in the image's precision and
        rounded once to `dtype` (the image's by default): the values of (x * 255 - mean) / std on the
        image expanded to 3 channels, then .to(dtype), in fewer passes: the scaling on the one channel,
        the division written straight in `dtype` (it rounds its float32 result as .to() does). For a
        batch of 8 at 1024² that is about 0.35 GB of traffic instead of 0.58."""
        dtype = image.dtype if dtype is None else dtype
        x = image.expand(-1, 3, -1, -1)
        if self.input_norm == "unit":
            return x.to(dtype)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():   # ONNX export, torch.compile: plain ops
            return ((x * 255.0 - self.pixel_mean) / self.pixel_std).to(dtype)
        centred = image * 255.0 - self.pixel_mean   # (N, 3, S, S) by broadcasting
        return torch.div(centred, self.pixel_std, out=torch.empty(centred.shape, dtype=dtype, device=centred.device))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) in [0, 1] -> image embedding (N, c, h, w), in the encoder's dtype (the
        normalisation stays in the image's precision: the pixel mean/std buffers are float32)."""
        return self.image_encoder(self.prepare(image, next(self.image_encoder.parameters()).dtype))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) in [0, 1] -> mask logits (N, K, S, S)."""
        return self.decode(self.encode(image), image.shape[-1])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(image))


# ---------------------------------------------------------------------- K classes from one or more XctSam

def _fused_upscaling(seq: nn.Module, tokens: torch.Tensor):
    """(conv1, norm, conv2) when `seq` is segment-anything's mask-decoder upscaling with the fast parts
    swapped in (FastConvTranspose2d with stride = kernel and a bias, FastLayerNorm2d, exact GELUs) and
    layout.upscale_logits can run on these image tokens (eager, no gradients, weights in their dtype,
    the kernels available); None otherwise: the layers run one by one."""
    from . import layout

    if not isinstance(seq, nn.Sequential) or len(seq) != 5:
        return None
    conv1, norm, act1, conv2, act2 = seq
    fast_norm = {fast for part, _, fast in fast_swaps() if part == "upscale" and fast is not FastConvTranspose2d}
    convs_ok = all(type(cv) is FastConvTranspose2d and cv.is_one_gemm() and cv.bias is not None
                   and cv.kernel_size[0] == cv.kernel_size[1] and cv.weight.dtype == tokens.dtype
                   for cv in (conv1, conv2))
    if not (convs_ok and conv1.kernel_size == conv2.kernel_size and type(norm) in fast_norm
            and all(type(a) is nn.GELU and a.approximate == "none" for a in (act1, act2))
            and conv1.in_channels == tokens.shape[-1] and conv2.in_channels == conv1.out_channels
            and tuple(norm.weight.shape) == (conv1.out_channels,)):
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in seq.parameters()):
        return None
    probe = tokens.new_empty((0, conv1.out_channels))   # what the norm will see: rows of conv1's channels
    return (conv1, norm, conv2) if layout.plain_layer_norm(norm, probe) else None


def upsample_logits(low: torch.Tensor, size: int) -> torch.Tensor:
    """Low-res mask logits (N, K, 4h, 4w) -> (N, K, size, size) float32, bilinear, per channel."""
    return F.interpolate(low.float(), size=(size, size), mode="bilinear", align_corners=False)


class ClassNet(nn.Module):
    """K class channels from XctSam models: paper mode = one single-head model per class (K encoder
    passes per image), shared mode = one model with K heads (one encoder pass)."""

    def __init__(self, models: list[XctSam]):
        super().__init__()
        self.models = nn.ModuleList(models)
        # CUDA streams, one per head: decode runs the heads side by side on them (forked from the
        # current stream and joined back), for a CUDA graph to capture; None: one after the other
        self.head_streams = None

    @property
    def image_size(self) -> int:
        return self.models[0].image_size

    @property
    def num_classes(self) -> int:
        return sum(m.num_heads for m in self.models)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [m.encode(image) for m in self.models]

    def decode(self, embeddings: list[torch.Tensor], size: int) -> torch.Tensor:
        """Embeddings -> probabilities (N, K, size, size) in float32: the models' low-res logits side
        by side, then one upsampling and the sigmoid in place (upsampling works per channel, so the
        same numbers as each model's decode, without copying the full-size logits together)."""
        if self.head_streams is None:
            low = torch.cat([m.low_res_logits(e) for m, e in zip(self.models, embeddings)], dim=1)
        else:
            low = self._low_res_side_by_side(embeddings)
        return torch.sigmoid_(upsample_logits(low, size))

    def _low_res_side_by_side(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """The heads' low-res logits, each head on a stream of head_streams: a decoder head is a chain of
        small kernels, each waiting on the one before, and the heads do not wait on each other. The
        same kernels on the same inputs as one after the other."""
        main = torch.cuda.current_stream()
        streams = iter(self.head_streams)
        outs, used = [], []
        # every model's (src, pe) is made on the main stream and read on the heads' streams: held until
        # the joins, or the allocator (which tracks a block by the stream that made it) hands a model's
        # freed inputs to the next model's while a head may still read them
        inputs = []
        for m, e in zip(self.models, embeddings):
            inputs.append(m.decoder_inputs(e))
            src, pe = inputs[-1]
            for d in m.mask_decoders:
                s = next(streams)
                s.wait_stream(main)
                with torch.cuda.stream(s):
                    outs.append(m._decode(d, src, pe))
                used.append(s)
        for s in used:
            main.wait_stream(s)
        del inputs   # joined: their reads are done before anything main queues next
        return torch.cat(outs, dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image), image.shape[-1])

    def cast_weights(self, dtype: torch.dtype) -> ClassNet:
        """Encoders, prompt encoders and decoders in `dtype`; the input normalisation (pixel mean/std),
        the prompt encoder's positional-frequency table, the upsampling of mask logits and the sigmoid
        stay float32. In place."""
        for m in self.models:
            # get_dense_pe multiplies a float32 coordinate grid by this table: it must stay float32, with
            # its float32 values (casting it back after .to(bf16) would keep the bf16 rounding: up to 0.05)
            pe = m.prompt_encoder.pe_layer
            table = pe.positional_encoding_gaussian_matrix
            for part in (m.image_encoder, m.prompt_encoder, m.mask_decoders):
                part.to(dtype)
            pe.positional_encoding_gaussian_matrix = table
        return self


def build_random_class_net(backbone: str = "vit_b", classes: int = 3, mode: str = "paper", seed: int = 0,
                           device: str | torch.device = "cpu") -> ClassNet:
    """segment-anything backbone with random weights (no checkpoint can be had here), K classes.

    Relative-position tables are drawn too (segment-anything initialises them to zero, which would
    make the attention bias vanish and hide mistakes in it). The same seed gives the same weights."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    configs = {  # embed dim, depth, heads, global blocks, image size, window (segment-anything's builders)
        "vit_b": (768, 12, 12, (2, 5, 8, 11), 1024, 14),
        "vit_l": (1024, 24, 16, (5, 11, 17, 23), 1024, 14),
        "vit_h": (1280, 32, 16, (7, 15, 23, 31), 1024, 14),
        "tiny": (32, 2, 2, (1,), 64, 3),   # for tests: 4×4 tokens, one windowed and one global block
    }
    if backbone not in configs:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(configs)}")
    if mode not in ("paper", "shared"):
        raise ValueError(f"mode must be 'paper' or 'shared', not {mode!r}")
    dim, depth, heads, glob, img, win = configs[backbone]
    out, patch = (256, 16) if backbone != "tiny" else (32, 16)
    grid = img // patch
    gen = torch.Generator().manual_seed(seed)

    def one_sam() -> XctSam:
        sam = Sam(
            image_encoder=ImageEncoderViT(depth=depth, embed_dim=dim, img_size=img, mlp_ratio=4,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads,
                                          patch_size=patch, qkv_bias=True, use_rel_pos=True,
                                          global_attn_indexes=glob, window_size=win, out_chans=out),
            prompt_encoder=PromptEncoder(embed_dim=out, image_embedding_size=(grid, grid),
                                         input_image_size=(img, img), mask_in_chans=16),
            mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=out, iou_head_depth=3,
                                     iou_head_hidden_dim=256,
                                     transformer=TwoWayTransformer(depth=2, embedding_dim=out,
                                                                   mlp_dim=2048 if backbone != "tiny" else 64,
                                                                   num_heads=8 if backbone != "tiny" else 2)),
            pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
        net = XctSam.from_sam(sam, 1 if mode == "paper" else classes)
        with torch.no_grad():   # seeded draws on the CPU generator: same weights on any device; every
            for name, p in net.named_parameters():   # head its own (from_sam copies head 0)
                if p.dim() > 1 or "rel_pos" in name:
                    std = 0.1 if "rel_pos" in name else (1.0 / p[0].numel()) ** 0.5
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return net

    # what the draws above leave (biases, the prompt encoder's frequency table) comes from the modules'
    # own initialisation on the global generator: seeded too, and the caller's state given back after
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = [one_sam() for _ in range(classes if mode == "paper" else 1)]
    return ClassNet(models).eval().requires_grad_(False).to(device)


def encoder_flops(model: XctSam) -> float:
    """Floating-point operations (multiply-add = 2) of one image through a segment-anything
    ImageEncoderViT: patch embedding, every block's linears and attention, the neck."""
    enc = model.image_encoder
    s = model.image_size
    patch = enc.patch_embed.proj.kernel_size[0]
    g = s // patch
    dim = enc.patch_embed.proj.out_channels
    flops = 2.0 * g * g * dim * 3 * patch * patch
    for blk in enc.blocks:
        w = blk.window_size
        if w > 0:
            gp = -(-g // w) * w                     # padded grid: segment-anything pads before attention
            n_tok, n_win = w * w, (gp // w) ** 2
        else:
            gp, n_tok, n_win = g, g * g, 1
        mlp = blk.mlp.lin1.out_features
        flops += 2.0 * gp * gp * 4 * dim * dim + 2.0 * g * g * 2 * dim * mlp   # qkv + proj (padded), MLP
        hd = dim // blk.attn.num_heads
        # QKᵀ and PV, plus the two relative-position einsums (q against H and W tables)
        flops += n_win * blk.attn.num_heads * (4.0 * n_tok * n_tok * hd + 2.0 * n_tok * hd * (2 * int(n_tok ** 0.5)))
    neck_out = enc.neck[0].out_channels
    flops += 2.0 * g * g * dim * neck_out + 2.0 * g * g * neck_out * neck_out * 9
    return flops


# ---------------------------------------------------------------------- the fast forward

FAST_PARTS = ("attention", "decoder_attention", "patch_embed", "mlp", "upscale", "block_layout")


def accelerate(net: nn.Module, attention_impl: str = "auto", parts=FAST_PARTS) -> nn.Module:
    """Swap, in `net`, every segment-anything image-encoder Attention for the same maths through
    xctrt.gpu.attention (fused relative-position flash attention on CUDA, one opaque operator for
    torch.compile), every mask-decoder Attention for scaled_dot_product_attention (no bias there, so
    PyTorch's fused kernels apply), every PatchEmbed for one matrix product over the unfolded
    patches, every MLPBlock's first linear and activation for one GEMM with the activation in its
    epilogue, the mask decoders' stride-2 transposed convs for one GEMM each (channels-last out), every
    LayerNorm2d given a channels-last tensor (the decoders', the neck's) for one layer_norm, every
    two-way attention block for one that adds the image's positional encoding once, and every encoder
    Block's LayerNorms, window layout copies and first residual add for two fused kernels. `parts` names which of these swaps to make
    (FAST_PARTS: all; fast_swaps lists them). In place; the weights, and any wrapped qkv (Conv-LoRA),
    stay as they are."""
    unknown = set(parts) - set(FAST_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {FAST_PARTS}")
    swaps = [(base, fast, part) for part, base, fast in fast_swaps() if part in parts]
    for m in net.modules():
        for base, fast, part in swaps:
            if isinstance(m, base):
                m.__class__ = fast
                if part == "attention":
                    m.attention_impl = attention_impl
                break
    return net


_SWAPS: list[tuple[str, type, type]] = []


def fast_swaps() -> tuple[tuple[str, type, type], ...]:
    """(part, segment-anything's class, ours) for every swap accelerate() makes, in FAST_PARTS order;
    made once (all of ours but FastConvTranspose2d subclass segment-anything's, imported only here)."""
    if not _SWAPS:
        from segment_anything.modeling.common import LayerNorm2d, MLPBlock
        from segment_anything.modeling.image_encoder import Attention, Block, PatchEmbed
        from segment_anything.modeling.transformer import Attention as DecoderAttention
        from segment_anything.modeling.transformer import TwoWayAttentionBlock

        _SWAPS.extend((("attention", Attention, _make_fast_attention()),
                       ("decoder_attention", DecoderAttention, _make_fast_decoder_attention()),
                       ("decoder_attention", TwoWayAttentionBlock, _make_fast_two_way_block()),
                       ("patch_embed", PatchEmbed, _make_fast_patch_embed()),
                       ("mlp", MLPBlock, _make_fast_mlp()),
                       ("upscale", nn.ConvTranspose2d, FastConvTranspose2d),
                       ("upscale", LayerNorm2d, _make_fast_layer_norm_2d()),
                       ("block_layout", Block, _make_fast_block())))
    return tuple(_SWAPS)


def fast_classes() -> tuple[type, ...]:
    """Each part's first class of ours, in FAST_PARTS order: (FastAttention, FastDecoderAttention,
    FastPatchEmbed, FastMLPBlock, FastConvTranspose2d, FastBlock)."""
    first: dict[str, type] = {}
    for part, _, fast in fast_swaps():
        first.setdefault(part, fast)
    return tuple(first[p] for p in FAST_PARTS)


def _make_fast_block() -> type:
    from segment_anything.modeling.image_encoder import Block

    from . import layout
    from .attention import WINDOW_LAYOUTS, choose_fastest, close_to

    class FastBlock(Block):
        """segment-anything's encoder Block with norm1 + window partition and the first residual add +
        unpartition + norm2 as two fused kernels (xctrt.gpu.layout): ~0.5 GB less traffic per windowed
        ViT-B block for a batch of 8; a global block's norm1 is layout.layer_norm. Under torch.compile
        (which fuses the same chain itself), on the CPU, while recording gradients (the kernels have
        none), under autocast, or with norms that are not plain affine LayerNorms in x's dtype, it runs
        as the original.

        A windowed block with the fast attention (FastAttention, fused kernel, plain qkv) has a second
        way (attention.WINDOW_LAYOUTS): no partition at all, its windows read where they lie in the grid
        (FastAttention.image_windows), so its projections skip the padding. window_layout "auto" takes
        the faster per shape, timed on the device on the first call (choose_fastest); "partitioned" or
        "grid" fixes it. With the fast MLP (FastMLPBlock, the "mlp" part) the block's last residual add
        is its second GEMM's (add_onto), onto the sum add_layer_norm hands on with lin2's bias in it."""

        window_layout = "auto"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            plain = all(type(n) is nn.LayerNorm and n.weight is not None and n.bias is not None
                        and n.weight.dtype == x.dtype for n in (self.norm1, self.norm2))
            grads = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            if (torch.compiler.is_compiling() or not plain or grads or torch.is_autocast_enabled()
                    or not layout.available(x)):
                return super().forward(x)
            # segment-anything's patch embedding hands over a permuted view: one copy, in the first block
            shortcut = x.contiguous()
            return self._fused(shortcut, self._window_way(shortcut) if self.window_size > 0 else None)

        def _window_way(self, x: torch.Tensor) -> str:
            reads_grid = getattr(self.attn, "reads_grid", None)   # FastAttention's (the "attention" part)
            if reads_grid is None or not reads_grid(x):
                return "partitioned"
            if self.window_layout != "auto":
                return self.window_layout
            if not x.is_cuda:
                return "partitioned"
            key = ("window layout", tuple(x.shape), x.dtype, str(x.device))
            # the grid's first output is checked against the partitioned one's before it may be chosen
            return choose_fastest(key, WINDOW_LAYOUTS, lambda way: self._fused(x, way), same=close_to)

        def _fused(self, shortcut: torch.Tensor, way: str | None) -> torch.Tensor:
            ws = self.window_size
            # the MLP's second GEMM adds onto the residual where it can (FastMLPBlock, the "mlp" part)
            onto = getattr(self.mlp, "adds_onto", None)
            x_bias = self.mlp.lin2.bias if onto is not None and onto(shortcut) else None
            if way == "grid":
                a = self.attn.image_windows(layout.layer_norm(shortcut, self.norm1), ws)
                x, normed = layout.add_layer_norm(shortcut, a, self.norm2, x_bias=x_bias)
            else:
                if ws > 0:
                    x, pad_hw = layout.ln_window_partition(shortcut, self.norm1, ws)
                else:
                    x, pad_hw = layout.layer_norm(shortcut, self.norm1), None
                x, normed = layout.add_layer_norm(shortcut, self.attn(x).contiguous(), self.norm2, ws, pad_hw,
                                                  x_bias=x_bias)
            return self.mlp.add_onto(normed, x) if x_bias is not None else x + self.mlp(normed)

    FastBlock.__module__ = __name__
    return FastBlock


class FastConvTranspose2d(nn.ConvTranspose2d):
    """A transposed conv whose stride equals its kernel (SAM's mask-decoder upscaling, 2x2 stride 2) as
    one GEMM: every input pixel's channels times the (C_in, C_out*kh*kw) weight, then each pixel's
    kh x kw block put in place, channels-last (the NCHW result is a view of that). cuDNN ran the encoder's
    patchify conv, the same kind of layer the other way round, 20x slower than the GEMM of its FLOPs on
    an H200. Any other conv runs as before."""

    def is_one_gemm(self) -> bool:
        """Whether this conv is one GEMM: stride = kernel, no padding, dilation or groups."""
        kh, kw = self.kernel_size
        return (tuple(self.stride) == (kh, kw) and tuple(self.padding) == (0, 0)
                and tuple(self.output_padding) == (0, 0) and tuple(self.dilation) == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros")

    def gemm(self, pixels: torch.Tensor) -> torch.Tensor:
        """(P, C_in) input pixels -> (P, C_out*kh*kw), columns in (C_out, kh, kw) order: the bias repeats
        per kernel position."""
        kh, kw = self.kernel_size
        weight = self.weight.reshape(self.in_channels, -1)
        return pixels @ weight if self.bias is None else torch.addmm(self.bias.repeat_interleave(kh * kw), pixels, weight)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None or x.dim() != 4 or not self.is_one_gemm():
            return super().forward(x, output_size)
        (kh, kw), (n, c, h, w) = self.kernel_size, x.shape
        # a view where x is channels-last in memory (the mask decoders give it so), a copy otherwise
        y = self.gemm(x.permute(0, 2, 3, 1).reshape(n * h * w, c))
        # each pixel's kh x kw block put in place, channels last: one copy; NCHW as a view of it
        return y.view(n, h, w, self.out_channels, kh, kw).permute(0, 1, 4, 2, 5, 3).reshape(
            n, h * kh, w * kw, self.out_channels).permute(0, 3, 1, 2)


def _make_fast_layer_norm_2d() -> type:
    from segment_anything.modeling.common import LayerNorm2d

    from . import layout

    class FastLayerNorm2d(LayerNorm2d):
        """segment-anything's LayerNorm2d (over the channels of an NCHW tensor, written as eight
        pointwise passes) as one layer_norm where the tensor is channels-last in memory: one pass, the
        statistics in float32 whatever the dtype; layout.layer_norm's kernel where it can run (several
        short rows per program), torch's elsewhere. The mask decoders' upscaling gives it such
        tensors, and so does the encoder's neck where its convs keep the blocks' channels-last layout
        (CPU and cuDNN do; the meta device does not). Other tensors as before."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                rows = x.permute(0, 2, 3, 1)
                if layout.plain_layer_norm(self, rows):   # several rows per program (layout.layer_norm)
                    return layout.layer_norm(rows, self).permute(0, 3, 1, 2)
                return F.layer_norm(rows, (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
            return super().forward(x)

    FastLayerNorm2d.__module__ = __name__
    return FastLayerNorm2d


def _make_fast_two_way_block() -> type:
    from segment_anything.modeling.transformer import TwoWayAttentionBlock

    from . import layout

    class FastTwoWayBlock(TwoWayAttentionBlock):
        """segment-anything's two-way attention block with the image tokens' keys + key_pe made once:
        both cross attentions read it, and the image tokens do not change between them. One pass over
        the (N, hw, c) image tokens less per block; the same numbers. Its norm4, over those tokens, is
        layout.layer_norm where that can run (eager, no gradients), agreeing with torch's to a rounding."""

        def forward(self, queries, keys, query_pe, key_pe):
            if self.skip_first_layer_pe:
                queries = self.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + self.self_attn(q=q, k=q, v=queries)
            queries = self.norm1(queries)
            keys_pe = keys + key_pe
            queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=keys_pe, v=keys))
            queries = self.norm3(queries + self.mlp(queries))
            keys = keys + self.cross_attn_image_to_token(q=keys_pe, k=queries + query_pe, v=queries)
            if layout.plain_layer_norm(self.norm4, keys):   # the image tokens: 4096 rows per image
                return queries, layout.layer_norm(keys, self.norm4)
            return queries, self.norm4(keys)

    FastTwoWayBlock.__module__ = __name__
    return FastTwoWayBlock


def _make_fast_mlp() -> type:
    from segment_anything.modeling.common import MLPBlock

    class FastMLPBlock(MLPBlock):
        """segment-anything's MLP with lin1's bias and the activation in the GEMM's epilogue
        (torch._addmm_activation: cuBLASLt on CUDA). The encoder's GELU pass otherwise reads and writes the
        4x-wide hidden activation once more: 0.4 GB per ViT-B block for a batch of 8 at 1024², 4.8 GB of
        the encoder's ~20 GB of pointwise traffic. On CUDA cuBLASLt's GELU is the tanh approximation
        (at most 4.7e-4 from the exact erf GELU, below the bf16 rounding of the activations); on the CPU
        torch computes the exact GELU. Anything but a plain Linear, GELU or ReLU runs as before."""

        def _fused_act(self) -> bool:
            act = self.act
            return ((type(act) is nn.GELU and act.approximate == "none") or type(act) is nn.ReLU) \
                and type(self.lin1) is nn.Linear and self.lin1.bias is not None

        def _hidden(self, x: torch.Tensor) -> torch.Tensor:
            return torch._addmm_activation(self.lin1.bias, x.reshape(-1, x.shape[-1]), self.lin1.weight.t(),
                                           use_gelu=type(self.act) is nn.GELU)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self._fused_act():
                return super().forward(x)
            h = self._hidden(x)
            return self.lin2(h.reshape(*x.shape[:-1], h.shape[-1]))

        def adds_onto(self, x: torch.Tensor) -> bool:
            """Whether add_onto can run for x: the fused first GEMM, a plain lin2 with a bias, x's dtype."""
            return (self._fused_act() and type(self.lin2) is nn.Linear and self.lin2.bias is not None
                    and self.lin2.weight.dtype == x.dtype)

        def add_onto(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
            """base + self(x) - lin2.bias, in place in base (contiguous, x's shape with lin2's width; an
            encoder block passes its residual with lin2's bias already added, add_layer_norm's x_bias):
            the second GEMM adds onto the residual (beta = 1) instead of writing its output for a
            pass of its own to add, ~100 MB less traffic per ViT-B block for a batch of 8 at 1024².
            The residual is rounded once more (after lin2's bias, before the product) and the
            product's sum is rounded once, after the residual is in it, where torch's layers round
            the product and then the sum: results agree to a rounding."""
            h = self._hidden(x)
            base.view(-1, base.shape[-1]).addmm_(h, self.lin2.weight.t())
            return base

    FastMLPBlock.__module__ = __name__
    return FastMLPBlock


def _make_fast_patch_embed() -> type:
    from segment_anything.modeling.image_encoder import PatchEmbed

    from .attention import permuted_copy

    class FastPatchEmbed(PatchEmbed):
        """segment-anything's patch embedding (a conv whose stride equals its kernel) as one GEMM over the
        unfolded patches: cuDNN ran the 3 -> 768 channel, 16x16-stride conv of a batch of 8 at 2.1 ms on an
        H200, where the same FLOPs as a (32768 x 768) @ (768 x 768) product take about 0.1 ms
        (torch.compile's autotuning log, benchmarks/results/gpu_throughput_h200_2026-11-26)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            conv = self.proj
            (ph, pw), (b, c, hh, ww) = conv.kernel_size, x.shape
            if (tuple(conv.stride) != (ph, pw) or tuple(conv.padding) != (0, 0) or conv.groups != 1
                    or tuple(conv.dilation) != (1, 1) or hh % ph or ww % pw):
                return super().forward(x)   # not a plain patchify: the conv itself
            patches = permuted_copy(x.reshape(b, c, hh // ph, ph, ww // pw, pw), (0, 2, 4, 1, 3, 5)).reshape(
                b, hh // ph, ww // pw, c * ph * pw)
            return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)

    FastPatchEmbed.__module__ = __name__
    return FastPatchEmbed


def _make_fast_decoder_attention() -> type:
    from segment_anything.modeling.transformer import Attention

    class FastDecoderAttention(Attention):
        """segment-anything's two-way-transformer Attention through one fused SDPA call."""

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q = self._separate_heads(self.q_proj(q), self.num_heads)
            k = self._separate_heads(self.k_proj(k), self.num_heads)
            v = self._separate_heads(self.v_proj(v), self.num_heads)
            out = F.scaled_dot_product_attention(q, k, v)   # scale 1/sqrt(head dim), as the original
            return self.out_proj(self._recombine_heads(out))

    FastDecoderAttention.__module__ = __name__
    return FastDecoderAttention


def _make_fast_attention() -> type:
    from segment_anything.modeling.image_encoder import Attention

    from .attention import (_resolve_impl, choose_qkv_layout, close_to, image_window_attention, rel_pos_attention,
                            split_qkv)

    class FastAttention(Attention):
        """segment-anything's Attention, computed by one fused kernel (no N×N matrix in memory).
        qkv_layout "auto" takes q, k, v in place or copied heads-major, whichever the first call per
        shape timed faster on the device (views where nothing is timed); one of QKV_LAYOUTS fixes it."""
        attention_impl = "auto"
        qkv_layout = "auto"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            proj = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
            if not self.use_rel_pos:
                o = F.scaled_dot_product_attention(*split_qkv(proj, "in_place"), scale=self.scale)
            else:
                # q, k, v as views of the projection, or copied heads-major first: whichever the first
                # call per shape timed faster (on CUDA; views elsewhere), unless qkv_layout says
                key = (tuple(proj.shape), proj.dtype, str(proj.device), self.attention_impl)
                layout = self.qkv_layout if self.qkv_layout != "auto" else \
                    choose_qkv_layout(key, lambda lay: self._attend(proj, lay, h, w), same=close_to) \
                    if proj.is_cuda else "in_place"
                o = self._attend(proj, layout, h, w)
            # o laid out as (B, N, NH, D) by the operator: a view here, not a copy
            return self.proj(o.transpose(1, 2).reshape(b, h, w, -1))

        def reads_grid(self, x: torch.Tensor) -> bool:
            """Whether image_windows can run on x: relative positions, a plain qkv, the fused kernel."""
            return (self.use_rel_pos and type(self.qkv) is nn.Linear
                    and _resolve_impl(self.attention_impl, x) == "triton")

        def image_windows(self, x: torch.Tensor, ws: int) -> torch.Tensor:
            """The block's windowed attention and output projection from its unpartitioned normed input
            x (B, H, W, C), contiguous: (B, H, W, C), as window_unpartition of forward() on the windows."""
            return self.proj(image_window_attention(x, self.qkv, self.num_heads, self.rel_pos_h, self.rel_pos_w,
                                                    ws, self.scale))

        def _attend(self, proj: torch.Tensor, layout: str, h: int, w: int) -> torch.Tensor:
            # the bias terms are made in float32 inside: bf16 would round a bias of ~10 to ±0.03 before
            # the softmax
            q, k, v = split_qkv(proj, layout)
            return rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, h, w, self.scale, self.attention_impl)

    FastAttention.__module__ = __name__
    return FastAttention


class GraphedStep:
    """A fixed-shape function replayed as one CUDA graph (no per-kernel launch cost).

    Call with a tensor of the captured shape; the result lives in the graph's static output and
    is overwritten by the next call, so consume (or copy) it first."""

    def __init__(self, fn, example, warmup: int = 2):
        self.static_in = [t.clone() for t in example] if isinstance(example, (list, tuple)) else [example.clone()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):       # warm-up outside capture: autotuning, lazy allocations
            for _ in range(warmup):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_in)

    def __call__(self, *inputs):
        for dst, src in zip(self.static_in, inputs):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_out


class OverlappedSteps:
    """A split model's batches run with each batch's decoders beside the next batch's encoders.

    The decoders are many small kernels, most of them waiting on the one before; alone on the device
    they make a few % of the encoder's arithmetic rate (~3 ms per batch of 8 for three heads on an H200,
    against ~20 ms of encoder, gpu_parts.json of 2026-11-28). Here they run on a second stream next to the encoder of the
    batch after theirs, in one CUDA graph: the embeddings of the batch before (held in the encoder
    graph's output) are copied into the decoder graph's input, then the decoders run on a side stream
    while the encoders run on the graph's own, and both join at the end. A run of batches is then

        first(x0)            encoders of x0 alone (enc's graph)
        next(x1) -> p0       decoders of x0 beside the encoders of x1
        ...
        last() -> pN         decoders of the last batch alone (dec's graph)

    Each returned probability tensor is the graph's static output: consume it before the next call.
    Without graphs (enc and dec None: the CPU, tests) the same order runs eagerly, one after the other.
    Whether the overlap pays is measured on the device (time_overlap): the decoders also take SMs and
    memory bandwidth from the encoders they run beside."""

    def __init__(self, encode, decode, enc: GraphedStep | None = None, dec: GraphedStep | None = None):
        self.encode, self.decode, self.enc, self.dec = encode, decode, enc, dec
        self.held = None   # eager: the embeddings waiting for their decoders
        self.graph = None
        if enc is None:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # the side stream's first work (cuBLAS workspace, lazy state) outside capture
            decode(*dec.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            main = torch.cuda.current_stream()
            for d, e in zip(dec.static_in, enc.static_out):   # the batch before's embeddings
                d.copy_(e)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.static_out = decode(*dec.static_in)
            emb = encode(*enc.static_in)
            for e, t in zip(enc.static_out, emb):   # where last() and the next call read them
                e.copy_(t)
            main.wait_stream(side)
        self._side = side

    def first(self, x) -> None:
        if self.graph is None:
            self.held = list(self.encode(x))
        else:
            self.enc(x)

    def next(self, x):
        if self.graph is None:
            p = self.decode(*self.held)
            self.held = list(self.encode(x))
            return p
        self.enc.static_in[0].copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out

    def last(self):
        if self.graph is None:
            p, self.held = self.decode(*self.held), None
            return p
        return self.dec(*self.enc.static_out)


def best_device_ms(runs: dict, repeats: int = 3) -> dict:
    """{name: device ms of runs[name]() on the current stream}, best of `repeats`, taken in turns (a
    replayed CUDA graph queues in microseconds: the events time the device's work)."""
    best = {name: float("inf") for name in runs}
    stream = torch.cuda.current_stream()
    for _ in range(repeats):
        for name, run in runs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            best[name] = min(best[name], start.elapsed_time(end))
    return {k: round(v, 4) for k, v in best.items()}


def time_overlap(steps: OverlappedSteps, x: torch.Tensor, batches: int = 4, repeats: int = 3) -> dict:
    """Device ms for `batches` batches of x: encoders then decoders per batch (the two graphs one after
    the other) against the overlapped order (OverlappedSteps), best of `repeats`, taken in turns."""
    enc, dec = steps.enc, steps.dec

    def serial():
        for _ in range(batches):
            enc(x)
            dec(*enc.static_out)

    def overlapped():
        steps.first(x)
        for _ in range(batches - 1):
            steps.next(x)
        steps.last()

    return best_device_ms({"serial": serial, "overlapped": overlapped}, repeats)
