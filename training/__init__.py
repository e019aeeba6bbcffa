"""Training side of xctrt (PyTorch only; the runtime in python/xctrt never imports it).

conv_lora  Conv-LoRA adapter for SAM's fused qkv projections, and apply_conv_lora()
sam_model  XctSam: prompt-free SAM that maps (N,1,S,S) images in [0,1] to class probabilities
losses     structure loss (weighted BCE + weighted IoU)
data       volume loading, class-balanced crop sampling, augmentation
train      the training loop and its checkpoint format
export     LoRA merge, ONNX export and xctrt model package writing
cyclegan   CycleGAN simulated -> real slice translation (train, translate + defect survival report)
unet25d    2.5D U-Net baseline (5 slices in, 4-class softmax, weighted Dice; train, predict label volumes)
common     device/AMP choice, atomic checkpoints, wall-clock step budget, staged-volume metadata
"""
