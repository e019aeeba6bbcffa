"""The GPU path: torch (CUDA, bf16) for the model, CuPy for the stages around it.

Imported only when a GPU run is asked for; the CPU runtime never needs torch, Triton or CuPy.

  attention.py   SAM attention with decomposed relative positions: reference, SDPA and a fused Triton kernel
  post.py        window / resize / aggregate / 3D components written once for NumPy and CuPy (exact to _core)
  sam.py         the prompt-free SAM segmenter and its fast bf16 forward (fused attention, CUDA graphs)
  pipeline.py    GPU segmentation: pinned host buffers, copy and compute streams, post-processing on device
  bench.py       naive / compiled / ours, stage by stage, for `xctrt bench --gpu`
"""
