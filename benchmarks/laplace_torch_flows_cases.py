"""The flows of benchmarks/laplace_torch_flows.py: data, trained models and one function per documented flow.

Every flow is ``flow(lib, data, record)``: ``lib`` holds one library's modules (laplace-torch's ``laplace``,
``laplace.utils``, ``laplace.curvature``, or posthoc's ``posthoc.compat.laplace`` mirror of them), ``data`` the
shared data and trained weights (:class:`FlowData`, built once, identical for both libraries), and ``record`` a
:class:`Record` that keeps the quantities to compare. Nothing in a flow names a library: the two runs differ only
by the modules in ``lib``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class Library:
    """One library's modules, as ported code imports them."""

    name: str
    laplace: ModuleType      # ``laplace`` (Laplace, marglik_training, ...)
    utils: ModuleType        # ``laplace.utils`` (the subnetwork masks)
    curvature: ModuleType    # ``laplace.curvature`` (the backend classes)


@dataclass
class Record:
    """The quantities a flow hands back: deterministic ones, Monte Carlo samples, exact (integer) ones.

    ``det[name]`` is a float64 tensor compared by relative difference; ``mc[name]`` a (S, ...) tensor of S draws,
    compared by the z-score of the sample means; ``exact[name]`` an integer tensor that must be equal.
    """

    det: dict[str, torch.Tensor] = field(default_factory=dict)
    mc: dict[str, torch.Tensor] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def deterministic(self, name: str, value: Any) -> None:
        """Keep a deterministic quantity (tensor, float or list of floats) as float64."""
        self.det[name] = torch.as_tensor(value).detach().to(torch.float64).reshape(-1).clone()

    def samples(self, name: str, draws: torch.Tensor) -> None:
        """Keep S Monte Carlo draws (S, ...) of a quantity, flattened to (S, D)."""
        self.mc[name] = draws.detach().to(torch.float64).reshape(draws.shape[0], -1).clone()

    def indices(self, name: str, value: torch.Tensor) -> None:
        """Keep an integer quantity (e.g. a subnetwork's positions) that both libraries must give exactly."""
        self.exact[name] = torch.as_tensor(value).detach().to(torch.int64).reshape(-1).clone()


# --------------------------------------------------------------------------- data and trained models
def sinusoid(n: int = 150, noise: float = 0.3, seed: int = 711) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1-D regression toy: x ~ U(0, 8), y = sin(x) + noise; test grid on [-5, 13] (500 points)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=generator) * 8
    y = torch.sin(x) + noise * torch.randn(n, 1, generator=generator)
    return x, y, torch.linspace(-5, 13, 500).unsqueeze(-1)


def train(model: nn.Module, loader: DataLoader, epochs: int, loss_fn: Callable[..., torch.Tensor], lr: float,
          weight_decay: float = 0.0, anchor: torch.Tensor | None = None, anchor_strength: float = 0.0) -> nn.Module:
    """Adam on ``loss_fn(model(x), y)`` (+ an optional pull towards ``anchor``), seeded; returns the model in eval."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            if anchor is not None:
                loss = loss + anchor_strength * (parameters_to_vector(model.parameters()) - anchor).square().sum()
            loss.backward()
            optimizer.step()
    return model.eval()


def tanh_mlp() -> nn.Module:
    """The regression example's 1-50-1 tanh network, seeded."""
    torch.manual_seed(711)
    return nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))


def relu_mlp(n_in: int, n_out: int, width: int = 20, seed: int = 0, activation: type[nn.Module] = nn.ReLU
             ) -> nn.Module:
    """A seeded n_in-width-width-n_out network (ReLU unless ``activation``)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), activation(), nn.Linear(width, width), activation(),
                         nn.Linear(width, n_out))


def blobs(n: int, centres: torch.Tensor, seed: int, spread: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """The n points around the rows of ``centres`` (one class each), with their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(centres)
    return centres[labels] + spread * torch.randn(n, centres.shape[1], generator=generator), labels


class PairRewardModel(nn.Module):
    """A scalar reward network: a pair batch (B, 2, d) gives the two rewards as logits (B, 2), items (B, d) give (B, 1)."""

    def __init__(self, dim: int = 3) -> None:  # noqa: D107
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, 50), nn.ReLU(), nn.Linear(50, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim == 3:
            return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
        return self.net(x)


class PairAxisRewardModel(PairRewardModel):
    """The same reward network run on the pairs (B, 2, d) themselves: (B, 2, 1) squeezed to logits (B, 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.net(x)
        return out.squeeze(-1) if x.ndim == 3 else out


def bayesopt_target(x: torch.Tensor) -> torch.Tensor:
    """A smooth 2-D test function on [0, 1]^2 (n, 1)."""
    return (torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.5 * (x[:, :1] - 0.3) ** 2)


@dataclass
class FlowData:
    """Everything both libraries share: data sets, loaders and trained weights (built by :func:`build_data`)."""

    items: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.items[key]

    def model(self, key: str) -> nn.Module:
        """A fresh copy of the trained model ``key`` (each library gets its own copy of the same weights)."""
        return copy.deepcopy(self.items[key])

    def to(self, dtype: torch.dtype) -> "FlowData":
        """The same data and weights cast to ``dtype`` (floating tensors, models, TensorDataset loaders); HF kept."""
        def cast(value: Any) -> Any:
            if isinstance(value, nn.Module):
                return copy.deepcopy(value).to(dtype)
            if isinstance(value, torch.Tensor):
                return value.to(dtype) if value.is_floating_point() else value
            if isinstance(value, DataLoader) and isinstance(value.dataset, TensorDataset):
                return DataLoader(TensorDataset(*(cast(t) for t in value.dataset.tensors)),
                                  batch_size=value.batch_size)
            return value

        return FlowData({key: value if key == "hf" else cast(value) for key, value in self.items.items()})


def build_data(fmnist_cnn: nn.Module, fmnist_train: TensorDataset, fmnist_test: TensorDataset,
               hf: dict[str, Any] | None) -> FlowData:
    """The data and MAP models of every flow (seconds); the FMNIST CNN and the GPT-2 come trained from the caller."""
    items: dict[str, Any] = {}
    x, y, x_test = sinusoid()
    items["sin_loader"] = DataLoader(TensorDataset(x, y), batch_size=150)
    items["sin_test"] = x_test
    items["sin_model"] = train(tanh_mlp(), items["sin_loader"], 1000, nn.MSELoss(), lr=1e-2)

    items["cnn"], items["cnn_train"] = fmnist_cnn, DataLoader(fmnist_train, batch_size=200)
    items["cnn_test"] = DataLoader(fmnist_test, batch_size=500)

    generator = torch.Generator().manual_seed(3)
    pairs = torch.randn(200, 2, 3, generator=generator)
    true_reward = pairs[..., 0] - 0.5 * pairs[..., 1] ** 2 + pairs[..., 2]
    prefer_second = (true_reward[:, 1] + 0.3 * torch.randn(200, generator=generator) > true_reward[:, 0]).long()
    items["reward_loader"] = DataLoader(TensorDataset(pairs, prefer_second), batch_size=50)
    items["reward_model"] = train(PairRewardModel(), items["reward_loader"], 30, nn.functional.cross_entropy,
                                  lr=1e-2, weight_decay=1e-3)
    items["reward_model_pair_axis"] = PairAxisRewardModel().eval()  # the same weights, the pair axis kept
    items["reward_model_pair_axis"].load_state_dict(items["reward_model"].state_dict())
    items["reward_test"] = torch.randn(5, 3, generator=generator)

    bo_x = torch.rand(30, 2, generator=generator)
    items["bo_loader"] = DataLoader(TensorDataset(bo_x, bayesopt_target(bo_x)), batch_size=30)
    items["bo_model"] = train(relu_mlp(2, 1, width=50), items["bo_loader"], 500, nn.MSELoss(), lr=1e-2,
                              weight_decay=1e-3)
    items["bo_candidates"] = torch.rand(8, 2, generator=generator)

    task_a = blobs(200, torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), seed=4)
    task_b = blobs(200, torch.tensor([[0.0, -2.0], [0.0, 2.0]]), seed=5)
    items["task_a"] = DataLoader(TensorDataset(*task_a), batch_size=100)
    items["task_b"] = DataLoader(TensorDataset(*task_b), batch_size=100)
    model_a = train(relu_mlp(2, 2, width=16, seed=1), items["task_a"], 100, nn.functional.cross_entropy, lr=1e-2)
    theta_a = parameters_to_vector(model_a.parameters()).detach().clone()
    model_b = train(copy.deepcopy(model_a), items["task_b"], 100, nn.functional.cross_entropy, lr=1e-2,
                    anchor=theta_a, anchor_strength=1e-2)
    items["model_a"], items["theta_a"] = model_a, theta_a
    items["theta_b"] = parameters_to_vector(model_b.parameters()).detach().clone()
    items["continual_test"] = torch.randn(20, 2, generator=generator) * 2

    three = blobs(300, torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]), seed=6)
    items["subnet_loader"] = DataLoader(TensorDataset(*three), batch_size=100)
    items["subnet_model"] = train(relu_mlp(2, 3, width=20, seed=2, activation=nn.Tanh), items["subnet_loader"], 100,
                                  nn.functional.cross_entropy, lr=1e-2)
    items["subnet_test"] = torch.randn(20, 2, generator=generator) * 2
    items["hf"] = hf
    return FlowData(items)


class DictBatchClassifier(nn.Module):
    """A Hugging Face sequence classifier behind laplace-torch's documented wrapper: dict batch in, logits (B, C) out."""

    def __init__(self, hf_model: nn.Module) -> None:  # noqa: D107
        super().__init__()
        self.hf_model = hf_model

    def forward(self, data: Any) -> torch.Tensor:  # noqa: D102
        return self.hf_model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def token_task(n: int, generator: torch.Generator, length: int = 12, vocab: int = 32) -> list[dict[str, Any]]:
    """The n sequences of ``length`` tokens (no padding) labelled 1 when most tokens are below vocab / 2 (10% flipped)."""
    tokens = torch.randint(1, vocab, (n, length), generator=generator)
    labels = ((tokens < vocab // 2).sum(1) * 2 > length).long()
    flip = torch.rand(n, generator=generator) < 0.1
    labels = torch.where(flip, 1 - labels, labels)
    return [{"input_ids": tokens[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def build_hf() -> dict[str, Any] | None:
    """The GPT-2 parts of the Hugging Face flow (about a minute), or None without transformers and peft.

    A 2-layer width-32 GPT-2 classifier from a config (random init, no download) is trained on :func:`token_task`
    (the base); "head" is the base with only the classification head trainable; "lora" adds rank-4 LoRA adapters
    on ``c_attn`` (peft, as laplace-torch's example) trained on more data, only the adapters requiring grad.
    """
    try:
        import peft
        import transformers
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(11)
    train_rows: Any = token_task(256, generator)    # a list of dicts is a map-style dataset for DataLoader
    test_rows: Any = token_task(64, generator)
    train_loader: DataLoader[dict[str, Any]] = DataLoader(train_rows, batch_size=32)
    torch.manual_seed(0)
    settings: dict[str, Any] = {"num_labels": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                                "attn_implementation": "eager"}  # the base config's arguments
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, **settings)
    base = DictBatchClassifier(transformers.GPT2ForSequenceClassification(config))

    def fit(model: nn.Module, epochs: int) -> None:
        torch.manual_seed(0)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        model.train()
        for _ in range(epochs):
            for batch in train_loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
                optimizer.step()
        model.eval()

    fit(base, 5)
    head = copy.deepcopy(base)
    for name, parameter in head.named_parameters():
        parameter.requires_grad_(name.startswith("hf_model.score"))
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"],
                                                                    lora_dropout=0.1, bias="none",
                                                                    fan_in_fan_out=True))
    fit(lora, 3)
    test = [{key: value for key, value in batch.items() if key != "labels"}
            for batch in DataLoader(test_rows, batch_size=32)]
    return {"base": base.eval(), "head": head.eval(), "lora": lora.eval(), "train": train_loader, "test": test}


# --------------------------------------------------------------------------- the flows
def regression_marglik(lib: Library, data: FlowData, record: Record) -> None:
    """The sinusoid with all weights, full and kron: fit, Adam on (log delta, log sigma) by -marglik, ``la(x)``."""
    for structure in ("full", "kron"):
        la = lib.laplace.Laplace(data.model("sin_model"), "regression", subset_of_weights="all",
                                 hessian_structure=structure)
        la.fit(data["sin_loader"])
        for name, value in marglik_gradients(la, prior=0.7, sigma=0.4).items():
            record.deterministic(f"{structure}: {name}", value)
        log_prior, log_sigma = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
        optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
        for _ in range(1000):
            optimizer.zero_grad()
            neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
            neg_marglik.backward()
            optimizer.step()
        record.deterministic(f"{structure}: prior precision", la.prior_precision)
        record.deterministic(f"{structure}: sigma_noise", la.sigma_noise)
        record.deterministic(f"{structure}: log marglik", la.log_marginal_likelihood())
        f_mu, f_var = la(data["sin_test"])
        record.deterministic(f"{structure}: f_mu (500)", f_mu)
        record.deterministic(f"{structure}: f_var (500)", f_var)
        f_mu_joint, f_cov = la(data["sin_test"][::50], joint=True)
        record.deterministic(f"{structure}: joint f_cov (10x10)", f_cov)
        generator = torch.Generator().manual_seed(1)
        record.samples(f"{structure}: sample(4000) mean", la.sample(4000, generator=generator))
        record.samples(f"{structure}: nn predictive_samples (10 x)",
                       la.predictive_samples(data["sin_test"][::50], pred_type="nn", n_samples=4000,
                                             generator=generator))


def marglik_gradients(la: Any, prior: float, sigma: float, step: float = 1e-3) -> dict[str, float]:
    """The log marglik's gradient in delta and sigma at (delta, sigma), by autograd and by finite differences.

    Autograd is what the hyperparameter loop uses; central finite differences (relative step ``step``) check it.
    Cost: 5 marglik evaluations and one backward pass.
    """
    delta_t, sigma_t = torch.tensor([prior], requires_grad=True), torch.tensor([sigma], requires_grad=True)
    value = la.log_marginal_likelihood(delta_t, sigma_t)
    grad_delta, grad_sigma = torch.autograd.grad(value, (delta_t, sigma_t))

    def at(d: float, s: float) -> float:
        return float(la.log_marginal_likelihood(torch.tensor([d]), torch.tensor([s])).detach())

    hd, hs = step * prior, step * sigma
    return {"d logZ / d delta (autograd)": float(grad_delta), "d logZ / d sigma (autograd)": float(grad_sigma),
            "d logZ / d delta (finite diff.)": (at(prior + hd, sigma) - at(prior - hd, sigma)) / (2 * hd),
            "d logZ / d sigma (finite diff.)": (at(prior, sigma + hs) - at(prior, sigma - hs)) / (2 * hs)}


def marglik_training(lib: Library, data: FlowData, record: Record) -> None:
    """Online Laplace during MAP training (full, scalar prior, BackPACK GGN backend), from the same init."""
    loader = data["sin_loader"]
    la, model, margliks, losses = lib.laplace.marglik_training(
        model=tanh_mlp(), train_loader=loader, likelihood="regression", hessian_structure="full",
        backend=lib.curvature.BackPackGGN, n_epochs=300, optimizer_kwargs={"lr": 1e-2}, prior_structure="scalar")
    record.deterministic("losses (300)", losses)
    record.deterministic("margliks (300)", margliks)
    record.deterministic("final prior precision", la.prior_precision)
    record.deterministic("final sigma_noise", la.sigma_noise)
    record.deterministic("final log marglik", la.log_marginal_likelihood())
    f_mu, f_var = la(data["sin_test"])
    record.deterministic("f_mu (500)", f_mu)
    record.deterministic("f_var (500)", f_var)


def calibration(lib: Library, data: FlowData, record: Record) -> None:
    """FMNIST CNN, last-layer kron, marglik-tuned prior, probit predictive on the test set: probs, NLL, ECE."""
    from posthoc import metrics

    la = lib.laplace.Laplace(data.model("cnn"), "classification", subset_of_weights="last_layer",
                             hessian_structure="kron")
    la.fit(data["cnn_train"])
    la.optimize_prior_precision(method="marglik")
    record.deterministic("prior precision", la.prior_precision)
    record.deterministic("log marglik", la.log_marginal_likelihood())
    with torch.no_grad():
        probs = torch.cat([la(x) for x, _ in data["cnn_test"]]).to(torch.float64)
    labels = torch.cat([y for _, y in data["cnn_test"]])
    record.deterministic("probs (2000 x 10)", probs)
    record.deterministic("NLL", metrics.nll(probs, labels))
    record.deterministic("ECE", metrics.ece(probs, labels))
    x_few = next(iter(data["cnn_test"]))[0][:5]
    record.samples("mc predictive_samples (5 x 10)",
                   la.predictive_samples(x_few, pred_type="glm", n_samples=4000,
                                         generator=torch.Generator().manual_seed(2)))


def bayesopt(lib: Library, data: FlowData, record: Record) -> None:
    """All-weights kron with ``enable_backprop``: the UCB's gradient in x through the predictive mean and variance."""
    la = lib.laplace.Laplace(data.model("bo_model"), "regression", subset_of_weights="all", hessian_structure="kron",
                             enable_backprop=True)
    la.fit(data["bo_loader"])
    la.optimize_prior_precision(n_steps=50)
    record.deterministic("prior precision", la.prior_precision)
    x = data["bo_candidates"].clone().requires_grad_(True)
    f_mu, f_var = la(x)
    grad_mu, = torch.autograd.grad(f_mu.sum(), x, retain_graph=True)
    grad_var, = torch.autograd.grad(f_var.sum(), x)
    record.deterministic("f_mu (8)", f_mu)
    record.deterministic("f_var (8)", f_var)
    record.deterministic("d f_mu / dx (8 x 2)", grad_mu)
    record.deterministic("d f_var / dx (8 x 2)", grad_var)
    record.notes["fd error d f_var/dx (rel)"] = f"{finite_difference_error(la, data['bo_candidates'], grad_var):.2e}"
    f_mu_joint, f_cov = la(data["bo_candidates"], joint=True)
    record.deterministic("joint f_cov (8x8)", f_cov)


def finite_difference_error(la: Any, x: torch.Tensor, grad_var: torch.Tensor, step: float = 1e-3) -> float:
    """Relative max difference between ``grad_var`` and central finite differences of sum(f_var) in x."""
    fd = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            plus, minus = x.clone(), x.clone()
            plus[i, j] += step
            minus[i, j] -= step
            fd[i, j] = (la(plus)[1].sum() - la(minus)[1].sum()).detach() / (2 * step)
    return float((fd - grad_var).abs().max() / grad_var.abs().max().clamp_min(1e-12))


def continual(lib: Library, data: FlowData, record: Record) -> None:
    """Two tasks: fit on A at theta_A, move to theta_B, prior_mean = theta_A, ``fit(override=False)`` on B."""
    for structure in ("diag", "kron", "full"):
        model = data.model("model_a")
        la = lib.laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        la.fit(data["task_a"])
        record.deterministic(f"{structure}: task A log marglik", la.log_marginal_likelihood())
        vector_to_parameters(data["theta_b"].clone(), model.parameters())
        la.prior_mean = data["theta_a"].clone()
        la.fit(data["task_b"], override=False)
        record.deterministic(f"{structure}: A+B log marglik", la.log_marginal_likelihood())
        record.deterministic(f"{structure}: A+B log marglik at delta=3", la.log_marginal_likelihood(torch.tensor(3.0)))
        with torch.no_grad():
            record.deterministic(f"{structure}: probs (20 x 2)", la(data["continual_test"]))
        if structure == "diag":
            record.deterministic(f"{structure}: posterior_variance", la.posterior_variance)


def subnetworks(lib: Library, data: FlowData, record: Record) -> None:
    """The masks of ``laplace.utils`` (positions must agree exactly) and subnetwork Laplace on two of them."""
    masks = lib.utils
    model = data.model("subnet_model")
    loader = data["subnet_loader"]
    diag = lib.laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    diag.fit(loader)
    chosen = {
        "LargestMagnitudeSubnetMask(64)": masks.LargestMagnitudeSubnetMask(model, n_params_subnet=64),
        "LargestVarianceDiagLaplaceSubnetMask(64)": masks.LargestVarianceDiagLaplaceSubnetMask(
            model, n_params_subnet=64, diag_laplace_model=diag),
        "ModuleNameSubnetMask(['2'])": masks.ModuleNameSubnetMask(model, module_names=["2"]),
        "ParamNameSubnetMask(['4.weight'])": masks.ParamNameSubnetMask(model, parameter_names=["4.weight"]),
        "LastLayerSubnetMask": masks.LastLayerSubnetMask(model),
    }
    indices = {}
    for name, mask in chosen.items():
        indices[name] = mask.select(loader)
        record.indices(f"{name} positions", indices[name])
    torch.manual_seed(5)
    record.indices("RandomSubnetMask(64) positions (seeded)",
                   masks.RandomSubnetMask(model, n_params_subnet=64).select(loader))
    for name, structure in (("LargestMagnitudeSubnetMask(64)", "full"), ("ModuleNameSubnetMask(['2'])", "diag")):
        la = lib.laplace.Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure=structure,
                                 subnetwork_indices=indices[name])
        la.fit(loader)
        la.optimize_prior_precision()
        record.deterministic(f"{structure} on {name}: prior precision", la.prior_precision)
        record.deterministic(f"{structure} on {name}: log marglik", la.log_marginal_likelihood())
        with torch.no_grad():
            record.deterministic(f"{structure} on {name}: probs (20 x 3)", la(data["subnet_test"]))


def functional_gp(lib: Library, data: FlowData, record: Record) -> None:
    """``hessian_structure="gp"`` on the sinusoid with all 150 points as the subset: f_mu, f_var, log marglik."""
    la = lib.laplace.Laplace(data.model("sin_model"), "regression", subset_of_weights="all", hessian_structure="gp",
                             n_subset=150, sigma_noise=0.3, prior_precision=2.0)
    la.fit(data["sin_loader"])
    record.deterministic("log marglik", la.log_marginal_likelihood())
    f_mu, f_var = la(data["sin_test"][::10])
    record.deterministic("f_mu (50)", f_mu)
    record.deterministic("f_var (50)", f_var)


def huggingface_lora(lib: Library, data: FlowData, record: Record) -> None:
    """A config-built GPT-2 classifier behind a dict-batch wrapper: last layer (pick_last), head only, LoRA (kron)."""
    hf = data["hf"]
    if hf is None:
        raise RuntimeError("transformers and peft are not installed in this environment")
    parts = [("last-layer full, pick_last", "base", dict(subset_of_weights="last_layer", hessian_structure="full",
                                                          feature_reduction="pick_last")),
             ("head only, diag", "head", dict(subset_of_weights="all", hessian_structure="diag")),
             ("LoRA, all (requires_grad), kron", "lora", dict(subset_of_weights="all", hessian_structure="kron"))]
    errors = []
    for label, key, options in parts:
        try:
            la = lib.laplace.Laplace(copy.deepcopy(hf[key]), likelihood="classification", **options)
            la.fit(hf["train"])
            la.optimize_prior_precision()
            record.deterministic(f"{label}: prior precision", la.prior_precision)
            with torch.no_grad():
                probs = torch.cat([la(batch) for batch in hf["test"]])
            record.deterministic(f"{label}: probs (held-out)", probs)
        except Exception as error:  # one part's failure is its row, the other parts still run
            errors.append(f"{label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    if errors:
        record.notes["errors"] = " | ".join(errors)


FLOWS: dict[str, Callable[[Library, FlowData, Record], None]] = {
    "regression_marglik": regression_marglik, "marglik_training": marglik_training, "calibration": calibration,
    "bayesopt": bayesopt, "continual": continual, "subnetworks": subnetworks,
    "huggingface_lora": huggingface_lora, "functional_gp": functional_gp,
}
