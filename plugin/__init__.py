"""eqattn simulator adapters: neighbour lists, ASE calculator, JAX-MD energy functions.

Importing it changes no other package: the ``eqattn`` command (and the test suite) start
faster by loading JAX-MD's submodules on first use, which a script can ask for as well with
:func:`plugin.jax_md_import.install` before anything imports JAX-MD."""

from .cache import enable_compilation_cache

__all__ = ["enable_compilation_cache"]
