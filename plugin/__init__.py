"""eqattn simulator adapters: neighbour lists, ASE calculator, JAX-MD energy functions."""

from . import jax_md_import
from .cache import enable_compilation_cache

# JAX-MD's submodules load when used, not all at once (seconds of start-up; see the module)
jax_md_import.install()

__all__ = ["enable_compilation_cache"]
