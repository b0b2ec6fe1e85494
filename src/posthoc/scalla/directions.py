"""The fixed directions of ScaLLA's "directions" objective, handed out a few at a time.

The targets J(x) V are computed for a chunk of :data:`DIRECTION_CHUNK` directions at a time (every target point
per chunk), so the JVPs' forward-mode activations hold a chunk's tangents, not all h. Rademacher directions are
not stored at all: :class:`RademacherDirections` keeps the generator's state at the start of each chunk and draws
the chunk again when it is needed (the same values as one (h, P) draw, since the CPU generator draws in
sequence), so they take ``DIRECTION_CHUNK`` P-vectors instead of h. Top-GGN eigenvectors come as an (h, P)
tensor from the Lanczos run (whose float64 Krylov basis of about 2h + 1 P-vectors is the peak of the fit).
"""

from __future__ import annotations

from typing import Iterator, Union

import torch

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


DirectionSet = Union[torch.Tensor, RademacherDirections]


def n_chunks(directions: DirectionSet, chunk: int = DIRECTION_CHUNK) -> int:
    """How many chunks :func:`direction_chunks` hands out."""
    return -(-len(directions) // chunk)


def direction_chunks(directions: DirectionSet, chunk: int = DIRECTION_CHUNK) -> Iterator[torch.Tensor]:
    """(k, P) chunks of ``directions`` in order: a tensor's row blocks, or a :class:`RademacherDirections`' chunks."""
    if isinstance(directions, RademacherDirections):
        yield from directions.chunks()
    else:
        yield from directions.split(chunk)
