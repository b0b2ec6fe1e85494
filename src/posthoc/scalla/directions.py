"""The fixed directions of ScaLLA's "directions" objective, handed out a few at a time.

The targets J(x) V are computed for a chunk of :data:`DIRECTION_CHUNK` directions at a time (every target point
per chunk), so the JVPs' forward-mode activations hold a chunk's tangents, not all h. Rademacher directions are
not stored at all: :class:`RademacherDirections` keeps the generator's state at the start of each chunk and draws
the chunk again when it is needed (the same values as one (h, P) draw, since the CPU generator draws in
sequence), so they take ``DIRECTION_CHUNK`` P-vectors instead of h. Top-GGN eigenvectors are not stored either:
:class:`EigenDirections` rebuilds each chunk from the Lanczos run's dual eigenvectors (one backward pass over the
eigen subsample per chunk, :func:`posthoc.curvature.ggn_operator.streamed_ggn_eigenpairs`), whose Krylov basis
is (n_sub K, 2h + 1) instead of the (P, 2h + 1) float64 of a Lanczos run on the parameters.
"""

from __future__ import annotations

from typing import Iterator, Union

import torch

from posthoc.curvature.ggn_operator import StreamedGGNEigenpairs

DIRECTION_CHUNK = 8  # directions per JVP pass over the target points


def rademacher(n: int, p: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """(n, p) random signs in ``dtype``. Memory: the output plus n p bytes.

    The draws are int8 (the same values and generator state as int64 draws, which took 8 n p bytes and another
    8 n p for the sign flip: 5 times the output's size in float32).
    """
    signs = torch.randint(0, 2, (n, p), generator=generator, dtype=torch.int8).to(dtype)
    return signs.mul_(2).sub_(1)


class RademacherDirections:
    """n random-sign directions of length p, drawn from ``generator`` now and redrawn chunk by chunk on demand.

    Constructing draws them once to advance ``generator`` exactly as ``rademacher(n, p, generator, dtype)`` would
    (cost: n p int8 draws, ``chunk`` P-vectors of memory at a time) and keeps each chunk's starting state.
    """

    def __init__(self, n: int, p: int, generator: torch.Generator, dtype: torch.dtype,
                 chunk: int = DIRECTION_CHUNK) -> None:
        self.n, self.p, self.dtype, self.chunk = n, p, dtype, chunk
        self.states: list[torch.Tensor] = []
        for start in range(0, n, chunk):
            self.states.append(generator.get_state())
            torch.randint(0, 2, (min(chunk, n - start), p), generator=generator, dtype=torch.int8)

    def __len__(self) -> int:
        return self.n

    def chunks(self) -> Iterator[torch.Tensor]:
        """The directions in order, (k, p) at a time (k <= chunk), each drawn again from its saved state."""
        for i, state in enumerate(self.states):
            generator = torch.Generator()
            generator.set_state(state)
            yield rademacher(min(self.chunk, self.n - i * self.chunk), self.p, generator, self.dtype)

    def dense(self) -> torch.Tensor:
        """All directions as one (n, p) tensor (for tests: the chunks' concatenation). Memory: n P-vectors."""
        return torch.cat(list(self.chunks()))


class EigenDirections:
    """n directions: the top-GGN eigenvectors of ``eigenpairs`` in order (k <= n), then n - k zero directions.

    Nothing P-sized is stored: each chunk of eigenvectors is rebuilt on demand (one backward pass over the eigen
    subsample, ``chunk`` P-vectors of memory). ``rebuilt`` counts the eigenvectors rebuilt so far (their cost:
    one VJP per subsample point each).
    """

    def __init__(self, eigenpairs: StreamedGGNEigenpairs, n: int, chunk: int = DIRECTION_CHUNK) -> None:
        if len(eigenpairs) > n:
            raise ValueError(f"{len(eigenpairs)} eigenvectors do not fit in {n} directions")
        self.eigenpairs, self.n, self.chunk, self.rebuilt = eigenpairs, n, chunk, 0

    def __len__(self) -> int:
        return self.n

    def chunks(self) -> Iterator[torch.Tensor]:
        """The directions in order, (k, P) at a time (k <= chunk): eigenvectors, then zero rows."""
        n_params = self.eigenpairs.operator.subset.n_params
        for vectors in self.eigenpairs.chunks(self.chunk):
            self.rebuilt += len(vectors)
            yield vectors
        for start in range(len(self.eigenpairs), self.n, self.chunk):
            yield self.eigenpairs.eigenvalues.new_zeros(min(self.chunk, self.n - start), n_params)

    @property
    def vjp_evaluations(self) -> int:
        """The cost of the rebuilds so far: one VJP per eigen-subsample point per eigenvector rebuilt."""
        return self.rebuilt * int(self.eigenpairs.info["n_sub"])

    def dense(self) -> torch.Tensor:
        """All directions as one (n, P) tensor (for tests). Memory: n P-vectors."""
        return torch.cat(list(self.chunks()))


DirectionSet = Union[torch.Tensor, RademacherDirections, EigenDirections]


def n_chunks(directions: DirectionSet, chunk: int = DIRECTION_CHUNK) -> int:
    """How many chunks :func:`direction_chunks` hands out."""
    return -(-len(directions) // chunk)


def direction_chunks(directions: DirectionSet, chunk: int = DIRECTION_CHUNK) -> Iterator[torch.Tensor]:
    """(k, P) chunks of ``directions`` in order: a tensor's row blocks of ``chunk``, or the directions' own chunks."""
    if isinstance(directions, torch.Tensor):
        yield from directions.split(chunk)
    else:
        yield from directions.chunks()
