"""``laplace.utils.matrix``: ``KronDecomposed``, the type of a Kronecker-factored ``posterior_precision``."""

from posthoc.laplace.kron_decomposed import KronDecomposed

__all__ = ["KronDecomposed"]
