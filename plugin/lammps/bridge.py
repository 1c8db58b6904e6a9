"""The ctypes bridge between the C++ pair style (``pair_eqattn.cpp``) and Python.

:func:`register` loads the built library into this process and hands it three C function
pointers made from Python functions: ``init`` (one per ``run`` command: parses the pair_style
arguments, loads the model, returns the ghost cutoff and the widest exchanged feature row),
``compute`` (every force evaluation: wraps LAMMPS' arrays as NumPy views without copying and
starts :meth:`RankEvaluator.compute`) and ``exchange`` (after each feature exchange LAMMPS
runs for it: resumes the computation); the computation's end adds the forces in place. The
library must be loaded here before LAMMPS' ``plugin load`` opens the same file, so that both
see one copy of its callback pointers. Python exceptions never cross into C++: they become the
message of a LAMMPS error.

pair_style syntax: ``pair_style eqattn MODEL [dtype float32|float64] [min_distance D]``, MODEL
a shipped model name (``copper``) or an ``.eqm`` path; ``pair_coeff * * Cu ...`` gives one
element per atom type.
"""

from __future__ import annotations

import ctypes
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from plugin.defaults import DEFAULTS

from .rank import RankEvaluator

__all__ = ["register", "evaluators", "parse_pair_style"]

_D = ctypes.POINTER(ctypes.c_double)
_I = ctypes.POINTER(ctypes.c_int)
_INIT = ctypes.CFUNCTYPE(
  ctypes.c_int,
  ctypes.c_char_p,
  ctypes.c_char_p,
  ctypes.c_int,
  _I,
  _D,
  _I,
  ctypes.c_void_p,
  ctypes.c_int,
)
_COMPUTE = ctypes.CFUNCTYPE(
  ctypes.c_int,
  ctypes.c_int,
  ctypes.c_int,
  ctypes.c_int,
  _D,
  _I,
  _I,
  _D,
  _I,
  _I,
  _D,
  _D,
  _D,
  _D,
  _D,
  _I,
  _I,
  ctypes.c_void_p,
  ctypes.c_int,
)
_EXCHANGE = ctypes.CFUNCTYPE(
  ctypes.c_int, ctypes.c_int, ctypes.c_int, _I, ctypes.c_void_p, ctypes.c_int
)

_state: Dict[str, object] = {"default_dtype": np.dtype(DEFAULTS.dtype).name, "model": None}
_evaluators: List[RankEvaluator] = []
_by_key: Dict[tuple, int] = {}
_potentials: Dict[str, object] = {}
# per handle: the running computation of this rank's step and where its results go
_pending: Dict[int, tuple] = {}


def evaluators() -> List[RankEvaluator]:
  """The rank evaluators created in this process (one per distinct pair_style/pair_coeff)."""
  return list(_evaluators)


def parse_pair_style(args: str, default_dtype: str = np.dtype(DEFAULTS.dtype).name) -> dict:
  """``MODEL [dtype float32|float64] [min_distance D]`` -> keyword arguments."""
  words = args.split()
  if not words:
    raise ValueError("pair_style eqattn needs a model: pair_style eqattn MODEL")
  out = {"model": words[0], "dtype": default_dtype, "min_distance": DEFAULTS.min_distance}
  rest = words[1:]
  if len(rest) % 2:
    raise ValueError(
      f"pair_style eqattn {args}: options come as keyword value pairs "
      "(dtype float32|float64, min_distance D)"
    )
  for key, value in zip(rest[::2], rest[1::2]):
    if key == "dtype":
      out["dtype"] = value
      if value == "float64" and not jax_x64():
        raise ValueError(
          "dtype float64 needs JAX's 64-bit mode: run the driver with --dtype float64"
        )
    elif key == "min_distance":
      out["min_distance"] = float(value)
    else:
      raise ValueError(f"pair_style eqattn: unknown option {key!r} (known: dtype, min_distance)")
  return out


def jax_x64() -> bool:
  import jax

  return bool(jax.config.jax_enable_x64)


def _error(err: int, length: int, exc: BaseException) -> int:
  message = f"{type(exc).__name__}: {exc}".encode()[: length - 1] + b"\0"
  ctypes.memmove(err, message, len(message))
  return 1


def _init(args, elements, ntypes, handle, cutoff, width, err, errlen) -> int:
  try:
    args, elements = args.decode(), elements.decode().split()
    key = (args, tuple(elements))
    if key not in _by_key:
      if len(elements) != ntypes:
        raise ValueError(f"pair_coeff * * needs one element per atom type ({ntypes})")
      options = parse_pair_style(args, str(_state["default_dtype"]))
      model = _state["model"] or options.pop("model")
      options.pop("model", None)
      if model not in _potentials:
        import potentials
        from plugin.exported import json_memo

        _potentials[model] = potentials.load(model, memo=json_memo("param-shapes"))
      _evaluators.append(RankEvaluator(_potentials[model], type_elements=elements, **options))
      _by_key[key] = len(_evaluators) - 1
    handle[0] = _by_key[key]
    cutoff[0] = _evaluators[_by_key[key]].cutoff
    width[0] = _evaluators[_by_key[key]].width
    return 0
  except Exception as e:  # noqa: BLE001 - reported by LAMMPS
    return _error(err, errlen, e)


def _compute(
  handle,
  nlocal,
  nghost,
  x,
  types,
  tags,
  box,
  periodicity,
  procgrid,
  f,
  energy,
  virial,
  eatom,
  features,
  nexchange,
  width,
  err,
  errlen,
) -> int:
  try:
    nall = nlocal + nghost
    view = np.ctypeslib.as_array
    if nall:
      xs, ts, tg = view(x, shape=(nall, 3)), view(types, shape=(nall,)), view(tags, shape=(nall,))
    else:
      xs, ts, tg = np.zeros((0, 3)), np.zeros(0, np.int32), np.zeros(0, np.int32)
    evaluator = _evaluators[handle]
    steps = evaluator.compute(
      xs,
      ts,
      tg,
      nlocal,
      box=view(box, shape=(6,)),
      periodicity=view(periodicity, shape=(3,)),
      procgrid=view(procgrid, shape=(3,)),
      features=view(features, shape=(nall, evaluator.width)) if nall and evaluator.width else None,
    )
    outputs = (nall, nlocal, f, energy, virial, eatom)
    nexchange[0] = 0
    _pending.pop(handle, None)
    try:
      width[0] = next(steps)
    except StopIteration as done:
      _write(outputs, done.value)
      return 0
    nexchange[0] = len(evaluator.widths)
    _pending[handle] = (steps, outputs, 2 * len(evaluator.widths))
    return 0
  except Exception as e:  # noqa: BLE001 - reported by LAMMPS
    traceback.print_exc()
    return _error(err, errlen, e)


def _exchange(handle, k, width, err, errlen) -> int:
  try:
    if handle not in _pending:
      raise RuntimeError(f"exchange {k} of pair_style eqattn without a computation in progress")
    steps, outputs, total = _pending[handle]
    try:
      width[0] = next(steps)
    except StopIteration as done:
      del _pending[handle]
      if k != total:
        raise RuntimeError(f"the computation ended after exchange {k} of {total}") from None
      _write(outputs, done.value)
      return 0
    if k == total:
      del _pending[handle]
      raise RuntimeError(f"the computation asked for more than {total} exchanges")
    return 0
  except Exception as e:  # noqa: BLE001 - reported by LAMMPS
    traceback.print_exc()
    return _error(err, errlen, e)


def _write(outputs, result) -> None:
  """A rank's result into LAMMPS' arrays."""
  nall, nlocal, f, energy, virial, eatom = outputs
  e, rows, forces, v, energies = result
  view = np.ctypeslib.as_array
  if len(rows):
    view(f, shape=(nall, 3))[rows] += forces  # rows are distinct
  energy[0] = e
  view(virial, shape=(6,))[:] = v
  if eatom and nlocal:
    view(eatom, shape=(nlocal,))[:] = energies


# The C function pointers must outlive every LAMMPS call: module globals.
_CALLBACKS = (_INIT(_init), _COMPUTE(_compute), _EXCHANGE(_exchange))


def register(
  library: Path, *, default_dtype: Optional[str] = None, model: Optional[str] = None
) -> ctypes.CDLL:
  """Load ``library`` (from :func:`plugin.lammps.build.build`) and connect it to Python
  (after LAMMPS' own library is loaded, whose symbols it uses). ``model``: replaces the model
  of every pair_style line; ``default_dtype``: when the pair_style line gives none."""
  if default_dtype is not None:
    _state["default_dtype"] = default_dtype
  _state["model"] = model
  lib = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
  lib.eqattn_set_callbacks(*(ctypes.cast(c, ctypes.c_void_p) for c in _CALLBACKS))
  return lib
