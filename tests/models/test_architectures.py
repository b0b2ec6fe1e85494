"""Shapes, parameter counts, gradients and error messages of the reference architectures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posthoc.models import (
    FMNISTCNN,
    MLP,
    MODELS,
    MultiHeadSelfAttention,
    ResidualBlock,
    SmallResNet,
    SmallViT,
    build_model,
    count_parameters,
)

NAMES = sorted(MODELS)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name)


def test_fmnist_cnn_has_reference_parameter_count() -> None:
    assert count_parameters(FMNISTCNN()) == 140_594


def test_mlp_default_parameter_count() -> None:
    expected = (784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)
    assert expected == 199_210
    assert count_parameters(MLP(784)) == expected


def test_other_parameter_counts_match_docstrings() -> None:
    assert count_parameters(SmallResNet()) == 77_754
    assert count_parameters(SmallViT()) == 71_946


def test_count_parameters_skips_frozen() -> None:
    model = FMNISTCNN()
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == 576 * 200 + 200 + 200 * 10 + 10


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_and_dtype(name: str, dtype: torch.dtype, images: torch.Tensor) -> None:
    model = _build(name).to(dtype)
    out = model(images.to(dtype))
    assert out.shape == (5, 10)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str, images: torch.Tensor) -> None:
    model = _build(name).double()
    y = torch.arange(5) % 10
    F.cross_entropy(model(images.double()), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("model", [FMNISTCNN(), MLP(784)], ids=["cnn", "mlp"])
def test_last_child_is_final_linear(model: nn.Sequential) -> None:
    last = list(model.children())[-1]
    assert isinstance(last, nn.Linear)
    assert last.out_features == 10


def test_fmnist_cnn_trunk_and_head(images: torch.Tensor) -> None:
    model = FMNISTCNN()
    trunk, head = model.trunk, model.head
    feats = trunk(images)
    assert feats.shape == (5, 576) == (5, model.feature_dim)
    torch.testing.assert_close(head(feats), model(images), rtol=0, atol=0)
    # The trunk shares parameters with the model; a deep copy does not.
    assert trunk.conv1.weight is model.conv1.weight
    clone = copy.deepcopy(trunk)
    assert clone.conv1.weight is not model.conv1.weight
    assert [type(m) for m in model.trunk][-1] is nn.Flatten
    assert all(p.ndim == 4 for p in trunk.parameters())
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))


def test_mlp_variants() -> None:
    uci = MLP(8, hidden=(50,), out_features=1, activation="relu", flatten=False)
    assert [type(m) for m in uci] == [nn.Linear, nn.ReLU, nn.Linear]
    assert uci(torch.randn(7, 8)).shape == (7, 1)
    for act, cls in [("gelu", nn.GELU), ("sigmoid", nn.Sigmoid), ("silu", nn.SiLU), ("tanh", nn.Tanh)]:
        m = MLP(2, hidden=(4, 4), out_features=3, activation=act, flatten=False)
        assert sum(isinstance(c, cls) for c in m) == 2
    assert isinstance(MLP(784)[0], nn.Flatten)


def test_unknown_activation_lists_options() -> None:
    with pytest.raises(ValueError, match="tanh.*relu.*gelu.*sigmoid.*silu"):
        MLP(784, activation="swish")


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="fmnist_cnn.*mlp.*resnet_small.*vit_small"):
        build_model("resnet50")


def test_build_model_passes_kwargs() -> None:
    model = build_model("fmnist_cnn", n_classes=3)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    assert build_model("mlp", in_features=4, flatten=False)(torch.randn(2, 4)).shape == (2, 10)


def test_vit_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible by patch_size"):
        SmallViT(patch_size=5)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SmallViT(dim=64, n_heads=5)


def test_vit_attention_weights_are_row_stochastic() -> None:
    torch.manual_seed(0)
    vit = SmallViT().double()
    tokens = vit.pos_embed(vit.patch_embed(torch.rand(3, 1, 28, 28, dtype=torch.float64)))
    attn = vit.blocks.block1.attn
    a = attn.attention_weights(vit.blocks.block1.ln1(tokens))
    assert a.shape == (3, 4, 16, 16)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 16, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hand_written_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(dim=64, n_heads=4).double()
    x = torch.randn(3, 16, 64, dtype=torch.float64)
    q, k, v = attn.qkv(x)
    ours = attn.attention_weights(x) @ v
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(attn(x), attn.out_proj(attn.merge_heads(ref)), rtol=0, atol=1e-10)


def test_vit_children_in_forward_order(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    vit = SmallViT()
    h = images
    for child in vit.children():
        h = child(h)
    torch.testing.assert_close(h, vit(images))
    assert isinstance(list(vit.children())[-1], nn.Linear)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in vit.modules())


def test_resnet_children_in_forward_order(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = SmallResNet().eval()
    assert [n for n, _ in net.named_children()] == ["stem", "blocks", "pool", "flatten", "fc"]
    h = images
    for child in net.children():
        h = child(h)
    torch.testing.assert_close(h, net(images))


def test_residual_block_structure(images: torch.Tensor) -> None:
    same = ResidualBlock(16, 16)
    down = ResidualBlock(16, 32, stride=2)
    assert isinstance(same.shortcut, nn.Identity)
    assert isinstance(down.shortcut, nn.Sequential)
    assert isinstance(down.shortcut.conv, nn.Conv2d) and isinstance(down.shortcut.bn, nn.BatchNorm2d)
    x = torch.randn(2, 16, 14, 14)
    assert down(x).shape == (2, 32, 7, 7)
    down.eval()
    torch.testing.assert_close(down(x), down.act2(down.branch(x) + down.shortcut(x)))


def test_resnet_eval_deterministic_and_train_updates_bn(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = SmallResNet()
    bn = net.stem.bn
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    net.eval()
    out1, out2 = net(images), net(images)
    assert torch.equal(out1, out2)
    assert torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) == 0
    net.train()
    net(images)
    assert not torch.equal(bn.running_mean, mean0)
    assert not torch.equal(bn.running_var, var0)
    assert int(bn.num_batches_tracked) == 1
    # Eval output uses the updated running statistics, so it changes.
    assert not torch.equal(net.eval()(images), out1)
