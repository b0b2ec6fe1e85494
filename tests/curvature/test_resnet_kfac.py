"""All-weights KFAC on a small torchvision-style BasicBlock ResNet with BatchNorm (float64, eval mode).

torchvision itself does not import against the CPU torch wheel, so the network is written out here: a 3x3
stem, two BasicBlocks (the second strided, with a 1x1 convolution and BatchNorm on the shortcut), global
average pooling and a Linear head. Every convolution and the head get Kronecker blocks; every BatchNorm affine
parameter the exact diagonal, at memory proportional to those parameters; the glm predictive matches the dense
J Λ⁻¹ Jᵀ.
"""

import torch
import torch.nn.functional as F
from references import DTYPE, dense_ggn, dense_jacobians
from torch import nn

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn plus the (projected) shortcut, then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """Stem conv-bn-relu, BasicBlocks [1, 1] of widths 3 and 4, average pool, Linear to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 3, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.layer1 = BasicBlock(3, 3, 1)
        self.layer2 = BasicBlock(3, 4, 2)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.3, 0.3)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_resnet_kfac_kron_convolutions_exact_batchnorm_diagonal():
    model = TinyResNet().to(DTYPE).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (6,), generator=g)
    subset = ParameterSubset(model, "all")

    def batches():
        yield x[:4], y[:4]
        yield x[4:], y[4:]

    curv = KronCurvature.fit(subset, batches, OutputFactors("classification"), progress=False)
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [layer.name for layer in curv.layers] == convs
    fallback = [subset.blocks[i] for i in curv.fallback]
    assert all(isinstance(b.layer, nn.BatchNorm2d) for b in fallback) and len(fallback) == 2 * 6
    exact = torch.diagonal(dense_ggn(subset, x, "classification"))
    positions = torch.cat([torch.arange(b.offset, b.offset + b.numel) for b in fallback])
    torch.testing.assert_close(curv.fallback_diag, exact[positions], rtol=1e-10, atol=1e-14)
    prior, scale = torch.tensor([0.8], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    jac = dense_jacobians(subset, x[:3])
    expected = jac @ torch.linalg.inv(curv.dense_precision(prior, scale)) @ jac.mT
    torch.testing.assert_close(curv.functional_covariance(x[:3], prior, scale), expected,
                               rtol=1e-7, atol=1e-10 * float(expected.abs().max()))
