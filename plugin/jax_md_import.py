"""Import the parts of JAX-MD that eqattn uses without the rest of the package.

``jax_md/__init__.py`` imports every submodule: ``jax_md.nn`` and ``jax_md.energy`` pull in
e3nn-jax, flax.nnx and scipy.signal, and ``jax_md.rigid_body`` builds its example shapes at
import time (about 120 small XLA compilations). ``import jax_md`` took 13.6 s where the
submodules eqattn needs (space, partition, simulate and their imports) took 3.3 s, measured
side by side on the project's 2-core box; that is most of a warm ``eqattn md`` start.

:func:`install` registers ``jax_md`` as a package whose submodules load on first use (PEP 562
module ``__getattr__``), so ``import jax_md; jax_md.energy`` and ``from jax_md import energy``
still work for users, loading ``energy`` when asked. Nothing changes if JAX-MD was imported
before eqattn.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["install"]

PACKAGE = "jax_md"


def _lazy_package(spec) -> types.ModuleType:
  module = types.ModuleType(PACKAGE, "JAX-MD; submodules load on first use (eqattn).")
  module.__spec__ = spec
  module.__loader__ = spec.loader
  module.__file__ = spec.origin
  module.__path__ = list(spec.submodule_search_locations)
  module.__package__ = PACKAGE

  def __getattr__(name: str):
    if name.startswith("__"):
      raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
    try:
      sub = importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{PACKAGE}.{name}":
        raise
      raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None
    setattr(module, name, sub)
    return sub

  module.__getattr__ = __getattr__
  return module


def install() -> None:
  """Make ``jax_md`` a lazily filled package, unless it is imported (or absent) already."""
  if PACKAGE in sys.modules:
    return
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.submodule_search_locations is None:
    return  # not installed: the import that needs it raises as usual
  sys.modules[PACKAGE] = _lazy_package(spec)
