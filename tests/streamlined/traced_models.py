"""Networks whose forward is not a chain of modules, for the traced path: a torchvision-style ResNet (BasicBlock
with a downsampling branch, in-place ReLU, ``out += identity``) and a WRN-style one (pre-activation blocks with
functional relu / dropout / avg_pool2d, ``torch.add`` joins, ``view(x.size(0), -1)``), written here since
torchvision is not a dependency."""

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLU, `out += identity`, a conv1x1 + BN downsampling branch."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, n_classes=3):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(6, n_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBasic(nn.Module):
    """WRN's pre-activation block: BN-ReLU-conv twice, dropout between, a 1x1 conv shortcut when shapes change."""

    def __init__(self, cin, cout, stride, drop=0.3):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.dropout(F.relu(self.bn2(y)), p=self.drop, training=self.training)
        y = self.conv2(y)
        return torch.add(x if self.equal else self.shortcut(o), y)


class TinyWRN(nn.Module):
    def __init__(self, n_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, 1, 1, bias=False)
        self.block1, self.block2 = WideBasic(4, 4, 1), WideBasic(4, 6, 2)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, n_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.block2(self.block1(self.conv(x)))))
        out = F.avg_pool2d(out, 4)
        return self.fc(out.view(out.size(0), -1))


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model
