"""Stage 2 of fiber sampling: a one-step map from a latent z ~ N(0, I) to parameters.

The walked samples theta_1..theta_M (M, P) are first reduced to their principal coordinates:

    theta = centre + U diag(s) c,    U (P, r) orthonormal, s (r,) the coordinate scales,

with centre the sample mean or a given point (the sampler uses theta*: the mean of samples from a curved
low-loss set can lie far outside it, theta* never does), r = min(latent_dim, rank of the centred samples)
and s the root mean square of the samples along each direction. Directions outside the top r are dropped
(the kept share of the spread is ``explained``). The map from z to c is either

- ``gaussian``: c = z (a Gaussian with the samples' second moments in the principal subspace), or
- ``flow``: c = g(z), an elementwise affine layer and a RealNVP-style stack of affine couplings, initialised
  at the identity (an untrained flow is the Gaussian map), trained by maximum likelihood on the samples'
  coordinates plus, in the sampler, a loss-aware term that penalises decoded samples leaving the low-loss
  set on a training minibatch, or
- ``variational``: the same flow, trained as a variational approximation of the walk's own target (the prior
  restricted to the low-loss set) within the principal subspace: it minimises
  E_q[log q(c) - log prior(theta(c))] + barrier_weight * E_q[hinge(training-NLL excess)], started narrow around
  theta* (inside the low-loss set). The entropy -E_q[log q] is what keeps the spread: the loss term alone
  shrinks the flow onto theta*. The walked samples give the subspace (and its scales), not the density: they
  lie far from theta* on a strongly curved set, so no linear decoding of their coordinates stays in the
  low-loss set (benchmarks/results/fiber_toy.md).

- ``anchored``: not a map of the principal coordinates but a mixture on the fiber built from the walk itself
  (:class:`AnchoredJitter`): the latent is (m, u), m uniform over the walked samples within the tolerance (the
  anchors), u ~ N(0, I_r), and

      theta = theta_m + U diag(sigma * room_m * s) u,     room_m = sqrt(slack_m / eps),

  U, s the principal directions and scales above (shared by all anchors), sigma (r,) a learned jitter scale and
  slack_m = eps - (anchor m's all-data NLL excess over the MAP's) the anchor's distance to the tolerance edge, so
  an anchor at the edge gets no jitter. sigma is trained like the ``variational`` flow: reverse KL to the prior
  restricted to the low-loss set, E[log q - log prior(theta)] + barrier. Its spread is stage 1's by construction
  (the anchors carry it); the jitter adds only local diversity around each anchor, small where the low-loss set
  is narrow (benchmarks/results/fiber_toy.md measures how small). The other maps cannot keep stage 1's spread
  away from the data: the principal coordinates of the walk explain almost none of the walked functions' spread
  there, and the prior restricted to any r-dimensional slice has offsets of norm ~ sqrt(r / delta), against
  ~ sqrt(P / delta) for the walk (same file).

The default stage 2 since issue 17 is none of these but ``pullback`` (:mod:`posthoc.fiber.pullback`): a walked
sample plus one long projected Langevin move, pulled back onto the low-loss set, whose samples are new (these
maps' samples either leave the low-loss set or stay at the walked samples).

Each way a new sample costs one map evaluation: O(r^2) for the flow plus one (r x P) product (``anchored``: one
(r x P) product and one row of the stored anchors, which cost M x P memory).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable, cast

import torch
from torch import nn

from posthoc.utils.optim import guarded_step


class DeformKind(str, Enum):
    """The names of the built-in stage-2 maps (module docstring); registered maps may add others."""
    GAUSSIAN = "gaussian"
    FLOW = "flow"
    VARIATIONAL = "variational"
    ANCHORED = "anchored"
    PULLBACK = "pullback"


class PrincipalCoordinates:
    """Principal coordinates of M samples (M, P) around a centre.

    Attributes: mean (P,) the centre, basis (P, r) orthonormal directions, scales (r,) the samples' RMS along them,
    explained the share of the total sample variance kept. Cost of fitting: a thin SVD of the (M, P) centred samples.
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, scales: torch.Tensor, explained: float) -> None:
        self.mean, self.basis, self.scales, self.explained = mean, basis, scales, float(explained)

    @classmethod
    def fit(cls, samples: torch.Tensor, rank: int, centre: torch.Tensor | None = None) -> "PrincipalCoordinates":
        """Fit the top-``rank`` principal coordinates of samples (M, P), M >= 2.

        ``centre`` (P,) replaces the sample mean as origin (the walk uses theta*: the mean of samples from a
        curved low-loss set can lie far outside it, the MAP never does). r = min(rank, numerical rank of the centred
        samples). Cost: a thin SVD, O(M^2 P). Raises ValueError for fewer than 2 samples or samples without spread.
        """
        if samples.ndim != 2 or samples.shape[0] < 2:
            raise ValueError(f"need at least 2 samples of shape (M, P) for principal coordinates, got "
                             f"{tuple(samples.shape)}")
        mean = samples.mean(0) if centre is None else centre
        centred = samples - mean
        _, sing, vh = torch.linalg.svd(centred, full_matrices=False)
        total = float((sing**2).sum())
        keep = int((sing > sing[0] * 1e-6).sum()) if total > 0 else 0
        if keep == 0:
            raise ValueError("the walked samples do not move away from their mean: no spread to model; "
                             "raise step_size or steps")
        r = min(rank, keep)
        scales = sing[:r] / math.sqrt(samples.shape[0] - 1)
        return cls(mean, vh[:r].T.contiguous(), scales, float((sing[:r] ** 2).sum()) / total)

    @property
    def rank(self) -> int:
        """r, the number of principal directions kept."""
        return self.scales.numel()

    def encode(self, thetas: torch.Tensor) -> torch.Tensor:
        """Whitened coordinates (M, r) of parameter vectors (M, P)."""
        return ((thetas - self.mean) @ self.basis) / self.scales

    def decode(self, coords: torch.Tensor) -> torch.Tensor:
        """Parameter vectors (M, P) of whitened coordinates (M, r)."""
        return self.mean + (coords * self.scales) @ self.basis.T

    def state_dict(self) -> dict[str, Any]:
        """The tensors and the explained share, for :meth:`from_state_dict` and checkpoints."""
        return {"mean": self.mean, "basis": self.basis, "scales": self.scales, "explained": self.explained}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrincipalCoordinates":
        """Rebuild the coordinates saved by :meth:`state_dict`."""
        return cls(state["mean"], state["basis"], state["scales"], state["explained"])


class AffineCoupling(nn.Module):
    """x_b = x_b * exp(s(x_a)) + t(x_a) on the entries where ``mask`` is 0 (x_a: where it is 1).

    s is bounded by tanh (scale factors in [e^-2, e^2]); the last layer starts at zero (identity map).
    """

    mask: torch.Tensor  # a buffer: 1 on the conditioning entries x_a

    def __init__(self, dim: int, mask: torch.Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        last = nn.Linear(hidden, 2 * dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), last)

    def _scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(x * self.mask).chunk(2, -1)
        keep = 1 - self.mask
        return 2.0 * torch.tanh(s / 2.0) * keep, t * keep

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Couple z (M, r) -> x (M, r): the masked entries scaled and shifted by functions of the others."""
        s, t = self._scale_shift(z)
        return z * torch.exp(s) + t

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, log|det dz/dx|) per row."""
        s, t = self._scale_shift(x)
        return (x - t) * torch.exp(-s), -s.sum(-1)


class CouplingFlow(nn.Module):
    """A normalising flow on r dimensions (r >= 2), the identity at start.

    An elementwise affine layer x = exp(a) z + b, then a stack of ``n_layers`` affine couplings with alternating
    (then random, seeded) masks, each with a ``hidden``-wide two-layer network. Raises ValueError for r < 2.
    """

    def __init__(self, dim: int, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        if dim < 2:
            raise ValueError("a coupling flow needs at least 2 latent dimensions; use deform='gaussian'")
        generator = torch.Generator().manual_seed(seed)
        layers = []
        for i in range(n_layers):
            if i < 2:
                mask = (torch.arange(dim) % 2 == i % 2).float()
            else:
                mask = torch.zeros(dim)
                mask[torch.randperm(dim, generator=generator)[: dim // 2]] = 1.0
            layers.append(AffineCoupling(dim, mask, hidden))
        self.layers = nn.ModuleList(layers)

    @property
    def couplings(self) -> list[AffineCoupling]:
        """The coupling layers, in order (typed view of ``layers``)."""
        return cast("list[AffineCoupling]", list(self.layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map base draws z (M, r) to coordinates x = g(z) (M, r); cost: one pass through the layers."""
        z = z * torch.exp(self.log_scale) + self.shift
        for layer in self.layers:
            z = layer(z)
        return z

    def sample_with_log_prob(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X = g(z) (M, r) and its log density log q(x) (M,) for base draws z (M, r).

        Cost: one forward pass (no inverse).
        """
        logdet = self.log_scale.sum().expand(z.shape[0])
        x = z * torch.exp(self.log_scale) + self.shift
        for layer in self.couplings:
            s, t = layer._scale_shift(x)
            x = x * torch.exp(s) + t
            logdet = logdet + s.sum(-1)
        return x, gaussian_log_prob(z) - logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density (M,) of coordinates x (M, r) under the flow with a N(0, I) base."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in reversed(self.couplings):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        x = (x - self.shift) * torch.exp(-self.log_scale)
        logdet = logdet - self.log_scale.sum()
        return -0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi) + logdet


def gaussian_log_prob(coords: torch.Tensor) -> torch.Tensor:
    """Log N(c; 0, I) per row (M,)."""
    return -0.5 * (coords**2).sum(-1) - 0.5 * coords.shape[-1] * math.log(2 * math.pi)


def flow_training_step(flow: CouplingFlow, optimizer: torch.optim.Optimizer, coords: torch.Tensor,
                       penalty: Callable[[CouplingFlow], torch.Tensor] | None = None,
                       penalty_weight: float = 0.0) -> float:
    """One full-batch optimizer step of the flow on whitened coordinates (M, r); returns the total loss.

    The loss is the mean NLL of the samples under the flow plus ``penalty_weight * penalty(flow)`` (the loss-aware
    term, see the sampler). Raises (via :func:`posthoc.utils.optim.guarded_step`) if the loss is not finite.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = -flow.log_prob(coords).mean()
    if penalty is not None and penalty_weight > 0:
        loss = loss + penalty_weight * penalty(flow)
    return guarded_step(optimizer, loss, _diverged("flow training"))


def _diverged(what: str) -> str:
    return f"{what} diverged (non-finite loss); lower flow_lr"


def reverse_kl_step(optimizer: torch.optim.Optimizer,
                    sample_with_log_prob: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                    energy: Callable[[torch.Tensor], torch.Tensor], what: str) -> float:
    """One optimizer step on the reverse KL to exp(-energy) known up to a constant; returns the loss.

    The loss is the mean of log q(x) + energy(x) over draws x (S, ...) with their log densities (S,) from
    ``sample_with_log_prob()``; ``what`` names the training in the error raised for a non-finite loss.
    """
    optimizer.zero_grad(set_to_none=True)
    draws, log_q = sample_with_log_prob()
    return guarded_step(optimizer, (log_q + energy(draws)).mean(), _diverged(what))


def variational_training_step(flow: CouplingFlow, optimizer: torch.optim.Optimizer, z: torch.Tensor,
                              energy: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """One optimizer step on the reverse KL of the flow to a target exp(-energy) known up to a constant.

    The loss is the mean over the base draws z (S, r) of log q(c) + energy(c), c = g(z), with ``energy`` mapping
    coordinates (S, r) to (S,) (the sampler's: minus the log prior plus the weighted loss-excess barrier). Returns
    the loss.
    """
    return reverse_kl_step(optimizer, lambda: flow.sample_with_log_prob(z), energy, "variational flow training")


def make_flow_optimizer(flow: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam over the flow's parameters with a small weight decay (1e-3) towards the identity map."""
    # weight decay keeps the flow close to the identity when there are few samples
    return torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=1e-3)


class AnchoredJitter(nn.Module):
    """Stage 2's ``anchored`` map (module doc): theta = anchors[m] + U diag(sigma * room[m] * s) u.

    Args:
        anchors: (M, P) the walked samples within the tolerance (not saved in the state dict: the sampler keeps
            them as its particles).
        room: (M,) per-anchor jitter factor in [0, 1] (sqrt of the anchor's share of the tolerance left).
        basis: (P, r) orthonormal shared jitter directions; scales: (r,) their scales (the walk's RMS spread).
        init_scale: sigma at the start of training (all r entries).

    The components live in the parallel r-dimensional slices theta_m + span(U), which are disjoint unless two
    anchors differ by a vector in span(U) (not the case for walked samples: they spread in far more than r
    directions), so the mixture's log density on the union of slices is exactly log N(u; 0, I) - log M -
    sum log(sigma * room_m * s); only -sum log sigma depends on the trained parameters. Cost per sample: one
    (r x P) product.
    """

    anchors: torch.Tensor  # buffers (not persistent), see Args
    room: torch.Tensor
    basis: torch.Tensor
    scales: torch.Tensor

    def __init__(self, anchors: torch.Tensor, room: torch.Tensor, basis: torch.Tensor, scales: torch.Tensor,
                 init_scale: float) -> None:
        super().__init__()
        if anchors.ndim != 2 or anchors.shape[0] < 1 or room.shape != (anchors.shape[0],):
            raise ValueError(f"need anchors (M, P) and room (M,), got {tuple(anchors.shape)} and {tuple(room.shape)}")
        if basis.shape != (anchors.shape[1], scales.numel()):
            raise ValueError(f"basis must be (P, r) = ({anchors.shape[1]}, {scales.numel()}), got {tuple(basis.shape)}")
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("room", room, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.log_sigma = nn.Parameter(torch.full_like(scales, math.log(init_scale)))

    @property
    def n_anchors(self) -> int:
        """M, the number of anchors."""
        return self.anchors.shape[0]

    @property
    def rank(self) -> int:
        """r, the number of jitter directions."""
        return self.scales.numel()

    def forward(self, index: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Parameter vectors (S, P) for anchor indices (S,) and jitter draws u (S, r)."""
        jitter = u * (torch.exp(self.log_sigma) * self.scales) * self.room[index].unsqueeze(-1)
        return self.anchors[index] + jitter @ self.basis.T

    def sample_with_log_prob(self, index: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Thetas (S, P) and their log density (S,) up to a constant that does not depend on sigma."""
        return self.forward(index, u), gaussian_log_prob(u) - self.log_sigma.sum()

    def draw(self, n_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent draws: anchor indices (n,) uniform over the anchors and u (n, r) ~ N(0, I)."""
        index = torch.randint(self.n_anchors, (n_samples,), generator=generator)
        u = torch.randn((n_samples, self.rank), generator=generator, dtype=self.scales.dtype)
        return index.to(self.anchors.device), u.to(self.anchors.device)


def anchored_training_step(jitter: AnchoredJitter, optimizer: torch.optim.Optimizer, index: torch.Tensor,
                           u: torch.Tensor, energy: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """One optimizer step on the reverse KL of the anchored mixture to exp(-energy); returns the loss.

    ``energy`` maps thetas (S, P) to (S,); the KL is averaged over the latent draws (index (S,), u (S, r)).
    """
    return reverse_kl_step(optimizer, lambda: jitter.sample_with_log_prob(index, u), energy,
                           "anchored jitter training")
