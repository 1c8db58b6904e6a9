"""The reference (teacher) of active learning: any ASE calculator, named by a spec string.

A spec is a string so that worker processes can build their own copy (calculators hold C
handles and open files; they do not pickle). Accepted forms: ``gfn2`` and ``gfn1`` (tblite's
GFN2-/GFN1-xTB), ``emt`` (ASE's EMT, for tests and toy metals), and ``module:callable`` (a
function or class called with no arguments that returns an ASE calculator).
"""

from __future__ import annotations

import importlib
import importlib.util

_TBLITE = {"gfn2": "GFN2-xTB", "gfn1": "GFN1-xTB"}
_FORMS = "'gfn2', 'gfn1', 'emt' or 'module:callable' (e.g. 'mypkg.refs:make_dft')"
_TBLITE_MISSING = "the gfn1/gfn2 references need tblite: pip install 'eqattn[data]'"


def _split(spec: str) -> tuple[str, str]:
  """(module, attribute) of a ``module:callable`` spec; ValueError if it is not one."""
  module, _, attr = spec.partition(":")
  if not module or not attr or ":" in attr:
    raise ValueError(f"reference {spec!r} is not one of {_FORMS}")
  return module.strip(), attr.strip()


def _factory(spec: str):
  """The callable a ``module:callable`` spec names (imports the module, builds nothing)."""
  module_name, attr = _split(spec)
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
      f"reference {spec!r}: cannot import module {module_name!r} ({e}); is it on sys.path?"
    ) from e
  for part in attr.split("."):  # `module:Class.method` reaches a classmethod factory
    if not hasattr(obj, part):
      raise ValueError(f"reference {spec!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(
      f"reference {spec!r}: {attr!r} is not callable; name a function or class that returns "
      "an ASE calculator when called with no arguments"
    )
  return obj


def _kind(spec) -> str:
  """'tblite', 'emt' or 'callable'; ValueError for anything else."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"reference {spec!r} is not one of {_FORMS}")
  name = spec.strip().lower()
  if name in _TBLITE:
    return "tblite"
  if name == "emt":
    return "emt"
  if ":" in spec:
    return "callable"
  raise ValueError(f"unknown reference {spec!r}: use {_FORMS}")


def check_spec(spec: str) -> str:
  """Validate a spec before any work starts, building no calculator; returns it stripped.

  tblite is only looked up (not loaded); a ``module:callable`` module is imported and its
  attribute checked to be callable (the call itself may be expensive, so it waits)."""
  kind = _kind(spec)
  if kind == "tblite" and importlib.util.find_spec("tblite") is None:
    raise ValueError(_TBLITE_MISSING)
  if kind == "callable":
    _factory(spec.strip())
  return spec.strip()


def reference_from_spec(spec: str):
  """A fresh ASE calculator from a spec (see the module docstring for the forms)."""
  kind = _kind(spec)
  spec = spec.strip()
  if kind == "tblite":
    try:
      from tblite.ase import TBLite
    except ImportError as e:
      raise ValueError(_TBLITE_MISSING) from e
    return TBLite(method=_TBLITE[spec.lower()], verbosity=0)
  if kind == "emt":
    from ase.calculators.emt import EMT

    return EMT()
  calc = _factory(spec)()
  if not all(callable(getattr(calc, m, None)) for m in ("get_potential_energy", "get_forces")):
    raise ValueError(
      f"reference {spec!r} returned {type(calc).__name__}, not an ASE calculator: the callable "
      "must return an object with get_potential_energy and get_forces (e.g. a subclass of "
      "ase.calculators.calculator.Calculator)"
    )
  return calc
