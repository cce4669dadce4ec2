# =====================================================================================================
#  Recipe "imagenet-resnet50": ImageNet with a ResNet-50, the architecture of Feldman & Zhang's
#  ImageNet estimates (2,000 runs on 70% subsets), at 64x64 pixels.
#
#  Expected accuracy: not yet measured on a GPU. There is no published figure for this setup:
#    - FZ 2020 trained full-resolution (224 px) ResNet-50s on 70% subsets; their subset accuracy is
#      not found (research/paper.md section 2);
#    - FFCV's 16-epoch ResNet-50 (progressive resizing 160-192 px, full training set) reaches
#      73.8% top-1 on 8 A100s (libffcv/ffcv-imagenet README, as quoted in research/perf.md);
#    - at 64x64, accuracy is markedly lower than at full resolution: Chrabaszcz, Loshchilov & Hutter
#      2017 (arXiv 1707.08819, "A Downsampled Variant of ImageNet") measured wide ResNets on
#      ImageNet64x64; use their tables, and a few runs of this recipe, as the reference.
#  Why 64x64: longtail keeps the whole dataset resident on each worker's device as float32
#  (docs/datasets.md: 63 GB for ImageNet at 64 px; 224 px would need 770 GB), so the imagefolder
#  dataset decodes once at `image_size`, and augmentation is a flip and a padded crop, not the
#  random-resized crop of FZ's pipeline.
#  Expected cost (derived, not measured): with small_input at 64 px the first block sees 64x64
#  (as a 224-px ResNet-50 sees 56x56): 10.4 GFLOP per forward pass, 31 per example trained (counted
#  with torch.utils.flop_counter; 24 at 224 px with the ImageNet stem), x 0.9 M examples x 16
#  epochs = ~450 PFLOP per run: ~30 min per run on an H200 at 30% of its bf16 peak, ~1,000
#  H200-hours for 2,000 runs, as much as FFCV-style full-resolution training (research/perf.md).
#  small_input = false (the ImageNet stem: 16x16 at the first block) costs 16x less and is likely
#  less accurate; neither is measured.
#
#  Training, in the style of FFCV's ResNet-50 configurations (not a copy; check before relying on
#  it): SGD momentum 0.9, batch 512, peak lr 0.85 (1.7 per 1,024 examples), linear warm-up over 2
#  epochs then linear decay to 0, weight decay 1e-4, label smoothing 0.1, 16 epochs; last batch
#  norm of each residual block starting at 0 (zero_init_residual, as in Goyal et al. 2017 for large
#  batches); bf16, channels_last, torch.compile (CUDA only).
# =====================================================================================================

NAME = "imagenet-resnet50"
DATASET = "imagefolder"

SPEC = """\
[model]
name = "resnet50"
small_input = true
zero_init_residual = true

[train]
epochs = 16
batch_size = 512
optimizer = "sgd"
lr = 0.85
momentum = 0.9
nesterov = false
weight_decay = 0.0001
schedule = "linear"
warmup_epochs = 2.0
label_smoothing = 0.1
augment = "flip-crop"
crop_padding = 4
precision = "bf16"
channels_last = true
compile = true
eval_batch_size = 1024
"""


def spec() -> str:
    """This recipe's [model] and [train] sections (TOML)."""
    return SPEC
