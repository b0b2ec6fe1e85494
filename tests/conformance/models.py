"""The conformance family: small float64 networks that are awkward in the ways real ones are.

Each factory returns a fresh :class:`Case`: the model the estimator is built on (left as a user would leave
it), the data, the user's steps between construction and ``fit`` and before ``predict``, and an eval-mode copy
of the network the posterior must be centred on (the reference). A new model joins with one entry in
:data:`MODELS`.

Trained networks are cached per factory (a few dozen full-batch Adam steps, well under a second each); every
call returns deep copies, so tests cannot leak state into each other.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DTYPE = torch.float64
N_TRAIN, N_TEST, N_FEATURES, N_CLASSES, N_REGRESSION_OUT = 96, 8, 5, 3, 2
N_TOKENS, VOCAB = 5, 3  # the tied-embedding model reads N_TOKENS integer tokens in [0, VOCAB)
TRAIN_STEPS, TRAIN_LR = 60, 0.03


@dataclass
class Case:
    """One model of the family, ready for an estimator.

    Attributes:
        name: the registry key.
        model: the network the estimator is constructed on, in the mode and with the weights the user left.
        likelihood: "classification" or "regression".
        x, y: training data (N, ...) and targets; x_test: (N_TEST, ...) inputs to predict on.
        reference: an eval-mode deep copy of the network at the weights ``fit`` must use (never handed to an
            estimator).
        last_layer: the name of the module whose parameters a correct ``subset_of_weights='last_layer'`` covers:
            the layer that produces the outputs (up to parameter-free operations after it).
        after_build: what the user does between building the estimator and calling fit (default: nothing).
        before_predict: what the user does before calling predict (default: nothing).
    """

    name: str
    model: nn.Module
    likelihood: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    reference: nn.Module
    last_layer: str
    after_build: Callable[[nn.Module], None] = field(default=lambda model: None)
    before_predict: Callable[[nn.Module], None] = field(default=lambda model: None)

    @property
    def has_user_steps(self) -> bool:
        """Whether the user does anything between construction, fit and predict."""
        return self.after_build is not Case.after_build or self.before_predict is not Case.before_predict

    def loader(self, batch_size: int = 32) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=batch_size, shuffle=False)

    @property
    def n_outputs(self) -> int:
        return N_CLASSES if self.likelihood == "classification" else N_REGRESSION_OUT

    def surrogate(self, n_out: int) -> nn.Module:
        """A small user surrogate for ScaLLA returning (B, n_out) from this model's inputs (seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            if not self.x.is_floating_point():
                return nn.Sequential(nn.Embedding(VOCAB, 4), nn.Flatten(), nn.Linear(N_TOKENS * 4, n_out)).to(DTYPE)
            return nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Linear(16, n_out)).to(DTYPE)


# ----------------------------------------------------------------------------------------------- networks
class HeadFirst(nn.Module):
    """(a) The output layer is registered before the body it follows."""

    def __init__(self, n_out: int = N_CLASSES) -> None:
        super().__init__()
        self.head = nn.Linear(8, n_out)
        self.body = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TiedEmbedding(nn.Module):
    """(b) A token model whose output projection is the input embedding's Parameter (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, VOCAB, bias=False)
        self.out.weight = self.embed.weight  # one Parameter, two modules

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens).mean(1))))


class TiedHeadFirst(nn.Module):
    """(b) As TiedEmbedding, but the output nn.Linear is registered first: the shared Parameter is the head's."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, VOCAB, bias=False)
        self.embed = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.embed.weight = self.out.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens).mean(1))))


class TwoHolders(nn.Module):
    """(b) Two nn.Linear modules hold the same weight Parameter (each its own bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(N_FEATURES, N_FEATURES)
        self.second = nn.Linear(N_FEATURES, N_FEATURES)
        self.second.weight = self.first.weight
        self.head = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def tied_sequential() -> nn.Sequential:
    """(b) An nn.Sequential (a chain, so every estimator can walk it) whose two hidden Linears share one weight."""
    net = nn.Sequential(nn.Linear(N_FEATURES, N_FEATURES), nn.Tanh(), nn.Linear(N_FEATURES, N_FEATURES), nn.Tanh(),
                        nn.Linear(N_FEATURES, N_CLASSES))
    net[2].weight = net[0].weight
    return net


class LinearTwice(nn.Module):
    """(b') One nn.Linear applied twice in the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(N_FEATURES, N_FEATURES)
        self.head = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class UnusedAndFrozen(nn.Module):
    """(c) A frozen first layer (requires_grad=False) and an nn.Linear registered last that forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(N_FEATURES, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, N_CLASSES)
        self.unused = nn.Linear(8, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.frozen(x)))))


class Scale(nn.Module):
    """Multiplies by a fixed factor (a temperature's inverse), stored as a buffer."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(factor, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def mlp(n_out: int, hidden_layers: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(N_FEATURES, 8), nn.Tanh()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, n_out))


# ----------------------------------------------------------------------------------------------- data and training
@functools.lru_cache(maxsize=None)
def _data(likelihood: str, tokens: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    n = N_TRAIN + N_TEST
    if tokens:
        x = torch.randint(0, VOCAB, (n, N_TOKENS), generator=g)
        y = torch.nn.functional.one_hot(x, VOCAB).sum(1).argmax(-1)  # the most frequent token
        return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:]
    x = torch.randn(n, N_FEATURES, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = (x @ torch.randn(N_FEATURES, N_CLASSES, generator=g, dtype=DTYPE)).argmax(-1)
    else:
        w = torch.randn(N_FEATURES, N_REGRESSION_OUT, generator=g, dtype=DTYPE)
        y = torch.sin(x @ w) + 0.1 * torch.randn(n, N_REGRESSION_OUT, generator=g, dtype=DTYPE)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str) -> nn.Module:
    """A few dozen full-batch Adam steps in train mode (so BatchNorm's running statistics move)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=TRAIN_LR)
    torch.manual_seed(1)  # dropout masks
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y) if likelihood == "classification" else \
            0.5 * (out - y).square().sum(-1).mean()
        loss.backward()
        optimizer.step()
    return model


@functools.lru_cache(maxsize=None)
def _trained(name: str) -> tuple[nn.Module, str, bool]:
    build, likelihood, tokens = _NETWORKS[name]
    x, y, _ = _data(likelihood, tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().to(DTYPE)
        return _train(model, x, y, likelihood), likelihood, tokens


def _case(name: str, network: str, last_layer: str, **hooks) -> Case:
    trained, likelihood, tokens = _trained(network)
    x, y, x_test = _data(likelihood, tokens)
    model = copy.deepcopy(trained).eval()
    reference = copy.deepcopy(trained).eval()
    return Case(name, model, likelihood, x, y, x_test, reference, last_layer, **hooks)


_NETWORKS: dict[str, tuple[Callable[[], nn.Module], str, bool]] = {
    "mlp": (lambda: mlp(N_CLASSES), "classification", False),
    "mlp_regression": (lambda: mlp(N_REGRESSION_OUT), "regression", False),
    "mlp2": (lambda: mlp(N_CLASSES, hidden_layers=2), "classification", False),
    "head_first": (HeadFirst, "classification", False),
    "tied_embedding": (TiedEmbedding, "classification", True),
    "tied_head_first": (TiedHeadFirst, "classification", True),
    "two_holders": (TwoHolders, "classification", False),
    "tied_sequential": (tied_sequential, "classification", False),
    "linear_twice": (LinearTwice, "classification", False),
    "unused_frozen": (UnusedAndFrozen, "classification", False),
    "scaled_head": (lambda: nn.Sequential(*mlp(N_CLASSES), Scale(2.5)), "classification", False),
    "scaled_head_regression": (lambda: nn.Sequential(*mlp(N_REGRESSION_OUT), Scale(2.5)), "regression", False),
    "dropout_batchnorm": (lambda: nn.Sequential(nn.Linear(N_FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(),
                                                nn.Dropout(0.3), nn.Linear(8, N_CLASSES)), "classification", False),
}


def loaded_weights(name: str, network: str, last_layer: str) -> Case:
    """(f) The estimator is built on a freshly initialised network; the user then loads the trained weights."""
    case = _case(name, network, last_layer)
    fresh = copy.deepcopy(case.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters") and module is not fresh:
                module.reset_parameters()
    trained_state = copy.deepcopy(case.model.state_dict())
    case.model = fresh
    case.after_build = lambda model: model.load_state_dict(trained_state)
    return case


def dropout_batchnorm() -> Case:
    """(e) Dropout and BatchNorm1d, trained so the running statistics are not the initial ones; the user leaves
    the model in train() mode before fit and again before predict. The predictive must be the eval network's."""
    case = _case("dropout_batchnorm", "dropout_batchnorm", "4")
    case.model.train()
    case.after_build = lambda model: model.train()
    case.before_predict = lambda model: model.train()
    return case


# name -> factory; the name is the test id. Add a model with one line here (and to SLOW if it is a control).
MODELS: dict[str, Callable[[], Case]] = {
    "mlp": lambda: _case("mlp", "mlp", "2"),  # the control: nothing awkward
    "mlp_regression": lambda: _case("mlp_regression", "mlp_regression", "2"),
    "head_first": lambda: _case("head_first", "head_first", "head"),
    "tied_embedding": lambda: _case("tied_embedding", "tied_embedding", "out"),
    "tied_head_first": lambda: _case("tied_head_first", "tied_head_first", "out"),
    "two_holders": lambda: _case("two_holders", "two_holders", "head"),
    "tied_sequential": lambda: _case("tied_sequential", "tied_sequential", "4"),
    "linear_twice": lambda: _case("linear_twice", "linear_twice", "head"),
    "unused_frozen": lambda: _case("unused_frozen", "unused_frozen", "head"),
    "scaled_head": lambda: _case("scaled_head", "scaled_head", "2"),
    "scaled_head_regression": lambda: _case("scaled_head_regression", "scaled_head_regression", "2"),
    "dropout_batchnorm": dropout_batchnorm,
    "loaded_weights": lambda: loaded_weights("loaded_weights", "mlp2", "4"),
    "loaded_weights_regression": lambda: loaded_weights("loaded_weights_regression", "mlp_regression", "2"),
}

# The plain controls (nothing awkward) confirm the references; they run with -m slow.
SLOW = {"mlp", "mlp_regression"}


def model_params() -> list:
    """The MODELS names as pytest params, the SLOW ones marked slow."""
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name) for name in MODELS]
