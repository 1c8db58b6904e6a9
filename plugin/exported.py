"""Traced programs kept on disk (``jax.export``), so a new process skips tracing and lowering.

JAX's persistent compilation cache (:mod:`plugin.cache`) saves XLA's work, but every new
process still traces the model in Python and lowers it to MLIR before it can look the program
up: about 2 s of a warm first ASE call on one core, most of what is left. :class:`ExportedJit`
is ``jax.jit(fn)`` that, while eqattn's cache is enabled (:func:`plugin.enable_compilation_cache`,
on by default in the ``eqattn`` command), serialises each traced program with ``jax.export``
into ``<cache>/exported/`` and in later processes deserialises it instead of tracing ``fn``.

A file is keyed by everything the program depends on besides its argument values: a digest of
eqattn's own source files, the JAX/jaxlib/flax/numpy versions, the backend, the x64 flag, the
caller's key (model architecture, dtype, ...) and the argument shapes and dtypes. Unreadable
files are ignored and rewritten; files are written to a temporary name and renamed, so
concurrent processes never read half a file. Without an enabled cache it is plain ``jax.jit``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

import jax
import numpy as np

from . import cache

__all__ = ["ExportedJit", "source_digest"]

_SOURCE_DIGEST: Optional[str] = None


def source_digest() -> str:
  """SHA-256 over eqattn's Python sources (``potentials`` and ``plugin``), computed once."""
  global _SOURCE_DIGEST
  if _SOURCE_DIGEST is None:
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("potentials", "plugin"):
      for path in sorted((root / package).rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    _SOURCE_DIGEST = h.hexdigest()
  return _SOURCE_DIGEST


def _versions() -> str:
  out = []
  for dist in ("jax", "jaxlib", "flax", "numpy"):
    try:
      out.append(f"{dist}={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      out.append(f"{dist}=?")
  return ",".join(out)


def _shape_dtype(x) -> tuple:
  try:
    return x.shape, x.dtype
  except AttributeError:  # a Python scalar or list
    x = np.asarray(x)
    return x.shape, x.dtype


def _spec(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(*_shape_dtype(x))


class ExportedJit:
  """``jax.jit(fn)`` whose traced programs persist on disk while eqattn's cache is enabled.

  ``name`` names the files, ``key`` (hashable, with a stable ``repr``) says what the program
  depends on besides the arguments' shapes and dtypes. ``builds`` counts programs this object
  made ready (a trace, or a load from disk): XLA compiles (or loads) one per build.
  """

  def __init__(self, fn: Callable, name: str, key: Hashable) -> None:
    self.name, self.key, self.builds = name, key, 0
    self._fn = fn
    self._jit = jax.jit(self._counted)
    self._programs: dict = {}

  def _counted(self, *args):
    self.builds += 1  # runs once per trace
    return self._fn(*args)

  def __call__(self, *args) -> Any:
    folder = cache.current_folder()
    if folder is None:
      return self._jit(*args)
    leaves, tree = jax.tree_util.tree_flatten(args)
    signature = (tree, tuple(_shape_dtype(x) for x in leaves))  # per call: kept cheap
    program = self._programs.get(signature)
    if program is None:
      program = self._programs[signature] = self._program(folder, args, signature)
    return program(*args)

  def _program(self, folder: Path, args, signature) -> Callable:
    text = "\n".join(
      [
        source_digest(),
        _versions(),
        jax.default_backend(),
        str(jax.config.jax_enable_x64),
        self.name,
        repr(self.key),
        repr(signature),
      ]
    )
    path = folder / "exported" / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"
    exported = _read(path)
    if exported is None:
      specs = jax.tree_util.tree_map(_spec, args)
      exported = jax.export.export(jax.jit(self._fn))(*specs)
      try:
        data = exported.serialize()
      except ImportError:  # flatbuffers missing (an install without eqattn's dependencies)
        return self._jit  # counts its own traces
      _write(path, data)
    self.builds += 1
    return jax.jit(exported.call)


def _read(path: Path):
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception:  # missing, truncated, or from an incompatible JAX: trace again
    return None


def _write(path: Path, data: bytes) -> None:
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError:  # a read-only or full cache only costs the tracing again
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
