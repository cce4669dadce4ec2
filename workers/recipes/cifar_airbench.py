# =====================================================================================================
#  Recipe "cifar10-airbench": the airbench94 CIFAR-10 speed recipe (Keller Jordan, "94% on CIFAR-10
#  in 3.29 seconds on a single GPU", arXiv 2404.00498; github.com/KellerJordan/cifar10-airbench),
#  adapted to train_run: the fast recipe for thousands of CIFAR runs.
#
#  Expected accuracy: not yet measured on a GPU. Expected from airbench94: 94.0% test accuracy on
#  the full training set, 3.1-3.8 s per run on one A100 (research/perf.md section 1). This version
#  lacks airbench94's whitened stem, lookahead EMA, 64x learning rate for batch-norm biases and
#  test-time augmentation, and trains on 70% subsets, so expect it lower by an amount nobody has
#  measured yet: run a few runs on the real data before a campaign (docs/recipes.md).
#  Expected cost (derived, not measured): about 0.25 PFLOP per 70% run, under a second per run on
#  an H200 at airbench's A100 utilisation; `bash benchmarks/gpu.sh` measures it.
#
#  The network: model "airbench" (workers/models.py): 2x2 conv stem, three conv groups of 64, 256,
#  256 channels (3x3 conv, max-pool, BN, GELU, 3x3 conv, BN, GELU), global max-pool, linear head,
#  logits x 1/9.
#
#  Hyperparameters: airbench94's, translated from its summed loss and "decoupled" weight decay to
#  train_run's mean loss and PyTorch SGD:
#    airbench94   batch 1024, lr 11.5 and weight decay 0.0153 "per 1024 examples", momentum 0.85,
#                 Nesterov, label smoothing 0.2, 9.9 epochs, flip + 2-pixel translate
#    lr           11.5 / (1 + 1 / (1 - 0.85)) = 1.5 for the mean loss
#    weight_decay per-step shrink lr x wd = 0.0153 / 7.67 = 0.0020, so wd = 0.0020 / 1.5 = 0.0013
#    schedule     airbench ramps from 0.2x to the peak over the first 23% of steps, then decays
#                 linearly to 0.07x; here: linear warm-up from 0 over 2.3 of 10 epochs, then
#                 linear decay to 0
#    augment      flip, and a random crop with 2 pixels of zero padding (airbench pads by
#                 reflection; same translation range)
#  Speed: bf16 autocast, channels_last and torch.compile, as airbench94_compiled (CUDA only;
#  a CPU worker ignores them).
# =====================================================================================================

NAME = "cifar10-airbench"
DATASET = "cifar10"

SPEC = """\
[model]
name = "airbench"
widths = [64, 256, 256]
stem_channels = 24
logit_scale = 0.1111111111111111

[train]
epochs = 10
batch_size = 1024
optimizer = "sgd"
lr = 1.5
momentum = 0.85
nesterov = true
weight_decay = 0.0013
schedule = "linear"
warmup_epochs = 2.3
label_smoothing = 0.2
augment = "flip-crop"
crop_padding = 2
precision = "bf16"
channels_last = true
compile = true
"""


def spec() -> str:
    """This recipe's [model] and [train] sections (TOML)."""
    return SPEC
