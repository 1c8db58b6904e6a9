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
import importlib
import json
import os
import re
import struct
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

import jax
import numpy as np
from jax._src import tree_util  # the default pytree registry (rebuilding stored structures)

from . import cache

__all__ = ["ExportedJit", "source_digest", "params_digest", "json_memo"]

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


def params_digest(params) -> str:
  """SHA-256 over a parameter pytree's structure, shapes, dtypes and values: the key part of a
  program that bakes the parameters in as constants."""
  h = hashlib.sha256()
  leaves, tree = jax.tree_util.tree_flatten(params)
  h.update(repr(tree).encode())
  for x in leaves:
    x = np.asarray(x)
    h.update(f"{x.shape}{x.dtype}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def _versions() -> str:
  out = []
  for dist in ("jax", "jaxlib", "flax", "numpy", "jax-md"):  # jax-md: the MD programs
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
  depends on besides the arguments' shapes, dtypes and pytree structure: everything ``fn``
  closes over (a model's parameters baked in as constants, a box, ...). ``builds`` counts
  programs this object made ready (a trace, or a load from disk): XLA compiles (or loads) one
  per build.

  Arguments and results may be any pytrees (JAX-MD states and neighbour lists too): the stored
  program takes and returns flat leaves, and the result's structure is stored beside it, with
  custom nodes that also occur in the arguments (a neighbour list with its update function)
  named by their place there, so the new process fills in its own (:func:`_encode_tree`).
  Functions in the arguments' static data (that update function) are keyed by name only, so
  ``key`` must cover what they close over.
  """

  def __init__(
    self, fn: Callable, name: str, key: Hashable, on_load: Optional[Callable[[], None]] = None
  ) -> None:
    self.name, self.key, self.builds = name, key, 0
    self._on_load = on_load  # told when a program is loaded, i.e. built without a trace
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
      program = self._programs[signature] = self._program(folder, leaves, tree, signature)
    return program(leaves)

  def _program(self, folder: Path, leaves, tree, signature) -> Callable:
    text = "\n".join(
      [
        source_digest(),
        _versions(),
        jax.default_backend(),
        str(jax.config.jax_enable_x64),
        self.name,
        repr(self.key),
        _ADDRESS.sub("", repr(signature)),  # function reprs carry addresses
      ]
    )
    path = folder / "exported" / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"
    nodes = _nodes(tree)
    stored = _read(path, nodes)
    if stored is None:
      stored = self._export(leaves, tree, nodes)
      if stored is None:  # not storable: plain jit (counts its own traces)
        return lambda leaves: self._jit(*tree.unflatten(leaves))
      _write(path, stored[2])
    exported, out_tree, traced = stored
    self.builds += 1
    if not traced and self._on_load is not None:
      self._on_load()
    call = jax.jit(exported.call)
    return lambda leaves: out_tree.unflatten(call(*_committed_alike(leaves)))

  def _export(self, leaves, tree, nodes):
    """``(exported, out_tree, file bytes)``, or None where the program cannot be stored."""
    out_trees = []

    def flat(*leaves):
      out_leaves, out_tree = jax.tree_util.tree_flatten(self._fn(*tree.unflatten(leaves)))
      out_trees.append(out_tree)
      return out_leaves

    try:
      exported = jax.export.export(jax.jit(flat))(*map(_spec, leaves))
      header = json.dumps(_encode_tree(out_trees[0], nodes)).encode()
      # JSON has no tuples: a result whose structure does not come back as it was (tuple
      # dict keys, nested tuples in a node's data) would fail or retrace when loaded
      if _decode_tree(json.loads(header), nodes) != out_trees[0]:
        raise _NotStorable("the result's structure does not survive JSON")
      data = exported.serialize()
    except Exception:  # e.g. a custom call jax.export refuses, or flatbuffers missing: plain
      return None  # jit, which also raises any error of fn itself
    return exported, out_trees[0], struct.pack("<Q", len(header)) + header + bytes(data)


def json_memo(name: str) -> Callable[[str, Callable[[], Any]], Any]:
  """``memo(key, compute)``: ``compute()`` (a JSON-able value), kept in ``<cache>/exported/``
  while eqattn's cache is enabled, keyed by ``key``, eqattn's source digest and versions."""

  def memo(key: str, compute: Callable[[], Any]) -> Any:
    folder = cache.current_folder()
    if folder is None:
      return compute()
    text = "\n".join([source_digest(), _versions(), name, key])
    path = folder / "exported" / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.json"
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: compute and store again
      value = compute()
      _write(path, json.dumps(value).encode())
      return value

  return memo


def _committed_alike(leaves: list) -> list:
  """All arguments on the one device of the committed ones (if any): committed and uncommitted
  arguments lower to different programs (argument shardings key jit's cache), so a JAX-MD
  list fresh from ``allocate`` and the same list out of a chunk would cost two compilations."""
  for x in leaves:
    if getattr(x, "committed", False):
      devices = x.devices()
      if len(devices) == 1:
        return jax.device_put(leaves, next(iter(devices)))
      break
  return leaves


# ------------------------------------------------------------------------------------------
# result structures on disk

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_BUILTINS = {"tuple": tuple, "list": list, "dict": dict, "None": type(None)}
_LEAF = jax.tree_util.tree_structure(0)


class _NotStorable(Exception):
  """A result node that can be named neither by the arguments nor by value."""


def _nodes(tree) -> list:
  """Every node's ``(type, aux data)`` of ``tree``, depth first (leaves skipped)."""
  data = tree.node_data()
  if data is None:
    return []
  return [data] + [n for c in tree.children() for n in _nodes(c)]


def _same(a, b) -> bool:
  try:
    return bool(a == b)
  except Exception:  # e.g. arrays in aux data
    return a is b


def _encode_tree(tree, nodes: list):
  """A JSON-able description of ``tree``: builtin containers by kind, custom nodes as a
  reference to an equal node of the arguments (``nodes``) or, for plain aux data (a
  namedtuple, a dataclass without static fields), by type name and value."""
  data = tree.node_data()
  if data is None:
    return "*"
  kind, aux = data
  kids = [_encode_tree(c, nodes) for c in tree.children()]
  builtin = {v: k for k, v in _BUILTINS.items()}.get(kind)
  if builtin is not None:
    return ["builtin", builtin, aux, kids]
  for i, (k, a) in enumerate(nodes):
    if k is kind and _same(a, aux):
      return ["arg", i, kids]
  try:
    json.dumps(aux)
  except (TypeError, ValueError):
    raise _NotStorable(kind) from None
  return ["type", f"{kind.__module__}:{kind.__qualname__}", aux, kids]


def _decode_tree(code, nodes: list):
  if code == "*":
    return _LEAF
  kids = [_decode_tree(c, nodes) for c in code[-1]]
  if code[0] == "builtin":
    data = (_BUILTINS[code[1]], code[2])
  elif code[0] == "arg":
    data = nodes[code[1]]
  else:
    module, name = code[1].split(":")
    kind = importlib.import_module(module)
    for part in name.split("."):
      kind = getattr(kind, part)
    aux = tuple(code[2]) if isinstance(code[2], list) else code[2]
    data = (kind, aux)
  return jax.tree_util.PyTreeDef.from_node_data_and_children(tree_util.default_registry, data, kids)


def _read(path: Path, nodes: list):
  """``(exported, out_tree, None)`` from a stored file (None: not traced here), None if
  missing or unusable."""
  try:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    out_tree = _decode_tree(json.loads(data[8 : 8 + n]), nodes)
    return jax.export.deserialize(bytearray(data[8 + n :])), out_tree, None
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
