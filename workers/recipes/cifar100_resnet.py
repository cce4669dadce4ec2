# =====================================================================================================
#  Recipe "cifar100-resnet50": CIFAR-100 with a ResNet-50, the architecture of Feldman & Zhang's
#  CIFAR-100 estimates (4,000 runs on 70% subsets).
#
#  Expected accuracy: not yet measured on a GPU. Expected from Feldman & Zhang 2020 (arXiv
#  2008.03703, their last-layer table): 72.3 +- 0.3% test accuracy on 70% subsets (75.9-76.1% on
#  the full set) with their ResNet-50 recipe, which the paper does not publish (research/paper.md
#  section 2). The hyperparameters below are a standard CIFAR ResNet recipe, not theirs, so this
#  recipe's accuracy is known only once measured: check a few runs against 72% before a campaign.
#  Expected cost (derived, not measured): 2.6 GFLOP per 32x32 forward pass with the CIFAR stem,
#  7.8 per example trained (counted with torch.utils.flop_counter), x 35,000 examples x 40 epochs
#  = ~11 PFLOP per run: ~45 s per run on an H200 at 30% of its bf16 peak, ~2 days for 4,000 runs.
#
#  The network: model "resnet50" (torchvision's) with small_input = true: a 3x3 stride-1 stem and no
#  max-pool, so 32x32 images reach the first block at full resolution (FZ's ResNet has the same
#  `small_input` option).
#  Training: SGD, Nesterov momentum 0.9, batch 256, peak lr 0.2 (0.1 per 128 examples), linear
#  warm-up over 2 epochs then cosine decay, weight decay 5e-4, 40 epochs; flip + random crop with
#  4 pixels of zero padding (the CIFAR augmentation of FZ's code, libdata/numpy.py).
#  Speed: bf16 autocast, channels_last, torch.compile (CUDA only).
# =====================================================================================================

NAME = "cifar100-resnet50"
DATASET = "cifar100"

SPEC = """\
[model]
name = "resnet50"
small_input = true
zero_init_residual = false

[train]
epochs = 40
batch_size = 256
optimizer = "sgd"
lr = 0.2
momentum = 0.9
nesterov = true
weight_decay = 0.0005
schedule = "cosine"
warmup_epochs = 2.0
label_smoothing = 0.0
augment = "flip-crop"
crop_padding = 4
precision = "bf16"
channels_last = true
compile = true
"""


def spec() -> str:
    """This recipe's [model] and [train] sections (TOML)."""
    return SPEC
