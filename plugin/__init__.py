"""eqattn simulator adapters: neighbour lists, ASE calculator, JAX-MD energy functions."""

from .cache import enable_compilation_cache

__all__ = ["enable_compilation_cache"]
