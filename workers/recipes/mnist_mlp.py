# =====================================================================================================
#  Recipe "mnist-mlp": the MNIST demo of Feldman & Zhang's reference code
#  (google-research/heldout-influence-estimation, mnist-example/mnist_infl_mem.py).
#
#  Expected accuracy: not yet measured on a GPU. Expected from published MLPs of this size: about
#  98% test accuracy on full MNIST (the classifier table of yann.lecun.com/exdb/mnist lists a
#  784-500-300-10 net with cross-entropy at 1.53% error); the demo prints its "Avg test acc" but
#  the value is not recorded (research/paper.md section 2.1). On 70% subsets, a little lower.
#  Measured here, on a CPU only and not on full MNIST: on the 5,000 real MNIST images of dataset
#  mnist-5k (runs on 2,800 of its 4,000 training images, tested on its 1,000), 93.2% mean test
#  accuracy over 3 runs (92.9-93.5%), 0.8 s of training per run on one thread of a shared 2-core
#  x86-64 machine (torch 2.14.1). Fewer examples, so lower than full MNIST.
#  Cost: 0.54 M parameters, ~1.1 MFLOP per forward pass (~3.2 with the backward pass) per example:
#  thousands of runs are cheap on CPUs too, and workers/ensemble.py can train several runs of this
#  MLP in one vectorized step (workers.models.ensemble_options says when).
#
#  What the demo does and this recipe reproduces:
#    model       784-512-256-10 MLP, ReLU, softmax cross-entropy
#    optimizer   SGD with momentum 0.9 (heavy ball: jax.experimental.optimizers.momentum is
#                PyTorch's SGD without Nesterov), learning rate 0.1, constant, no weight decay
#    batches     128, reshuffled every epoch, the last one partial; 10 epochs
#    inputs      pixels / 255 (the mnist dataset does this), no augmentation
#  Different: the demo draws subsets and initial weights with numpy / JAX generators; longtail
#  derives them from the campaign seed (same distribution, other numbers).
# =====================================================================================================

NAME = "mnist-mlp"
DATASET = "mnist"

SPEC = """\
[model]
name = "mnist-mlp"

[train]
epochs = 10
batch_size = 128
optimizer = "sgd"
lr = 0.1
momentum = 0.9
nesterov = false
weight_decay = 0.0
schedule = "constant"
label_smoothing = 0.0
augment = "none"
precision = "fp32"
"""


def spec() -> str:
    """This recipe's [model] and [train] sections (TOML)."""
    return SPEC
