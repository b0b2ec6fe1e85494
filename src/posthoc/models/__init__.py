"""Reference architectures: the FMNIST CNN, LeNet-5, MLPs, a small ResNet and a small ViT.

Every learned map is an ``nn.Linear`` or ``nn.Conv2d`` (what KFAC hooks see), and each
network's children are listed in forward order so moment propagation can walk them.
"""

from posthoc.models.cnn import FMNISTCNN
from posthoc.models.lenet import LeNet
from posthoc.models.mlp import MLP, Activation, make_activation
from posthoc.models.registry import MODELS, build_model, count_parameters, register_model
from posthoc.models.resnet import ResidualBlock, SmallResNet
from posthoc.models.vit import (
    MultiHeadSelfAttention,
    PatchEmbedding,
    PositionalEmbedding,
    SmallViT,
    TokenMeanPool,
    TransformerBlock,
)

__all__ = [
    "Activation",
    "FMNISTCNN",
    "LeNet",
    "MLP",
    "MODELS",
    "MultiHeadSelfAttention",
    "PatchEmbedding",
    "PositionalEmbedding",
    "ResidualBlock",
    "SmallResNet",
    "SmallViT",
    "TokenMeanPool",
    "TransformerBlock",
    "build_model",
    "count_parameters",
    "make_activation",
    "register_model",
]
