"""One file container for model files and training checkpoints (``docs/conventions.md``).

Layout of every file::

    magic                     b"EQATTN-MODEL\\n" (model) or b"EQATTN-TRAIN\\n" (checkpoint)
    uint32 little-endian      format version
    uint64 little-endian      payload length in bytes
    32 bytes                  SHA-256 of the payload
    payload                   msgpack (flax.serialization) of a dict

A model's payload is ``{format_version, config, species, cutoff, units, metadata, params}``; a
checkpoint's is the training state. msgpack decoding builds only dicts, lists, numbers,
strings and NumPy arrays, so reading a file cannot run code (no pickle anywhere). Truncation and
corruption are caught by the length and the checksum before anything is decoded; wrong
versions and foreign files by the header. Checkpoints of eqattn before this container
(``b"EQATTN-CKPT\\n"``, no version field) are still read.

This module knows files and payloads only (it imports nothing of ``potentials``):
:class:`potentials.Potential` reads itself with :func:`read_model` and writes itself with
:func:`write_model`; ``potentials.load``/``save`` live in :mod:`potentials.potential`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Tuple, Union

import jax
import numpy as np
from flax import serialization

PathLike = Union[str, os.PathLike]

MAGIC = b"EQATTN-MODEL\n"
FORMAT_VERSION = 1
CHECKPOINT_MAGIC = b"EQATTN-TRAIN\n"
CHECKPOINT_VERSION = 2  # version 1 is the legacy layout below
LEGACY_CHECKPOINT_MAGIC = b"EQATTN-CKPT\n"  # + uint64 length + SHA-256 + payload
SUFFIX = ".eqm"
UNITS = {"energy": "eV", "length": "Angstrom", "mass": "amu"}
_HEADER = struct.Struct("<IQ32s")
_LEGACY_HEADER = struct.Struct("<Q32s")
MODEL_FIELDS = ("format_version", "config", "species", "cutoff", "units", "metadata", "params")


class ModelFileError(ValueError):
  """A file that is not a readable eqattn model."""


class CheckpointError(ValueError):
  """A file that is not a readable eqattn training checkpoint (or not of this run)."""


# ------------------------------------------------------------------ the container
def _atomic_write(path: PathLike, data: bytes) -> None:
  """Write ``data`` so that a crash never leaves a half-written file at ``path``."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def encode(content: Any, *, magic: bytes, version: int) -> bytes:
  """The bytes of a container holding ``content`` (a msgpack-able state dict)."""
  payload = serialization.msgpack_serialize(content)
  return magic + _HEADER.pack(version, len(payload), hashlib.sha256(payload).digest()) + payload


def write(path: PathLike, content: Any, *, magic: bytes, version: int) -> None:
  """Write ``content`` to ``path`` atomically in the container format."""
  _atomic_write(path, encode(content, magic=magic, version=version))


def _payload(data: bytes, start: int, length: int, digest: bytes, path, error) -> Any:
  payload = data[start:]
  if len(payload) != length:
    raise error(
      f"{path} is truncated or corrupt: payload is {len(payload)} bytes, header says {length}"
    )
  if hashlib.sha256(payload).digest() != digest:
    raise error(f"{path} is corrupt (checksum mismatch)")
  try:
    return serialization.msgpack_restore(payload)
  except Exception as e:  # a valid checksum over undecodable bytes: written by something else
    raise error(f"{path}: payload cannot be decoded ({e})") from None


def read(
  path: PathLike, *, magic: bytes, versions: Iterable[int], what: str, error=ModelFileError
) -> Tuple[int, Any]:
  """``(version, content)`` of a container file; ``error`` (naming ``what`` the file should
  be) for a foreign, truncated, corrupt or wrong-version file."""
  data = Path(path).read_bytes()
  versions = tuple(versions)
  if not data.startswith(magic):
    raise error(f"{path} is not an {what} file (no {magic!r} header)")
  if len(data) < len(magic) + _HEADER.size:
    raise error(f"{path} is truncated (incomplete header)")
  version, length, digest = _HEADER.unpack_from(data, len(magic))
  if version not in versions:
    raise error(
      f"{path} has {what} format version {version}; this eqattn reads version "
      f"{', '.join(map(str, versions))} (upgrade eqattn or re-export the file)"
    )
  return version, _payload(data, len(magic) + _HEADER.size, length, digest, path, error)


# ------------------------------------------------------------------ model files
def _plain(value: Any, where: str = "metadata"):
  """Check that metadata is JSON-like (so files stay portable and inspectable)."""
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"{where} must hold only JSON-like values (str, numbers, lists, dicts): {e}"
    ) from None
  return value


def write_model(
  path: PathLike,
  *,
  config: dict,
  species: Iterable[int],
  cutoff: float,
  metadata: dict,
  params: Any,
) -> None:
  """Write one model file (``config`` as ``ModelConfig.to_dict()``)."""
  params = jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(params))
  write(
    path,
    {
      "format_version": FORMAT_VERSION,
      "config": config,
      "species": list(species),
      "cutoff": cutoff,
      "units": UNITS,
      "metadata": _plain(dict(metadata)),
      "params": params,
    },
    magic=MAGIC,
    version=FORMAT_VERSION,
  )


def read_model(path: PathLike) -> dict:
  """The checked payload of a model file: every field of ``MODEL_FIELDS``, units checked;
  ``params`` still a raw state dict (check it with :func:`check_params`)."""
  _, content = read(path, magic=MAGIC, versions=(FORMAT_VERSION,), what="eqattn model")
  if not isinstance(content, dict) or not set(MODEL_FIELDS) <= set(content):
    missing = sorted(set(MODEL_FIELDS) - set(content if isinstance(content, dict) else ()))
    raise ModelFileError(f"{path}: missing fields {missing}")
  if content["units"] != UNITS:
    raise ModelFileError(f"{path}: units {content['units']} are not {UNITS}")
  return content


def check_params(params: Any, reference: Any, path: PathLike) -> Any:
  """``params`` (a state dict read from ``path``) restored into the structure of
  ``reference``; ``ModelFileError`` unless every leaf has the reference's shape and dtype."""
  ref_flat = {
    jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(reference)[0]
  }
  got_flat = {
    jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  if set(ref_flat) != set(got_flat):
    missing = sorted(set(ref_flat) - set(got_flat))[:3]
    extra = sorted(set(got_flat) - set(ref_flat))[:3]
    raise ModelFileError(
      f"{path}: parameters do not match the model config (missing {missing}, unexpected {extra})"
    )
  for k, ref in ref_flat.items():
    got = got_flat[k]
    if not isinstance(got, np.ndarray) or got.shape != ref.shape or got.dtype != ref.dtype:
      raise ModelFileError(
        f"{path}: parameter {k} has shape/dtype "
        f"{getattr(got, 'shape', None)}/{getattr(got, 'dtype', type(got))}, "
        f"expected {ref.shape}/{ref.dtype}"
      )
  return serialization.from_state_dict(reference, params)


def shipped_models() -> dict:
  """Names of the models shipped with the package -> their paths."""
  folder = resources.files("potentials") / "models"
  if not folder.is_dir():
    return {}
  return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(SUFFIX)}


def resolve(name_or_path: PathLike) -> Path:
  """A model file path, or the path of the shipped model of that name."""
  path = Path(name_or_path)
  if path.is_file():
    return path
  shipped = shipped_models()
  if str(name_or_path) in shipped:
    return shipped[str(name_or_path)]
  names = ", ".join(sorted(shipped)) or "none"
  raise FileNotFoundError(
    f"no model file {str(name_or_path)!r} and no shipped model of that name "
    f"(shipped models: {names})"
  )


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: PathLike, state: dict) -> None:
  """Write a training state (a msgpack-able pytree) atomically."""
  write(
    path, serialization.to_state_dict(state), magic=CHECKPOINT_MAGIC, version=CHECKPOINT_VERSION
  )


def _read_legacy_checkpoint(path: PathLike, data: bytes) -> Any:
  start = len(LEGACY_CHECKPOINT_MAGIC) + _LEGACY_HEADER.size
  if len(data) < start:
    raise CheckpointError(f"{path} is truncated or corrupt (incomplete header)")
  length, digest = _LEGACY_HEADER.unpack_from(data, len(LEGACY_CHECKPOINT_MAGIC))
  return _payload(data, start, length, digest, path, CheckpointError)


def write_legacy_checkpoint(path: PathLike, state: dict) -> None:
  """The pre-container checkpoint layout, kept only to test that it still loads."""
  payload = serialization.msgpack_serialize(serialization.to_state_dict(state))
  _atomic_write(
    path,
    LEGACY_CHECKPOINT_MAGIC
    + _LEGACY_HEADER.pack(len(payload), hashlib.sha256(payload).digest())
    + payload,
  )


def load_checkpoint(path: PathLike, template: dict) -> dict:
  """The training state in ``path`` restored into the structure of ``template``."""
  data = Path(path).read_bytes()
  if data.startswith(LEGACY_CHECKPOINT_MAGIC):
    content = _read_legacy_checkpoint(path, data)
  else:
    _, content = read(
      path,
      magic=CHECKPOINT_MAGIC,
      versions=(CHECKPOINT_VERSION,),
      what="eqattn training checkpoint",
      error=CheckpointError,
    )
  # keys added to the state since the file was written keep the template's value
  fresh = serialization.to_state_dict(template)
  content = {**{k: v for k, v in fresh.items() if k not in content}, **content}
  try:
    return serialization.from_state_dict(template, content)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"{path} does not match this training run (another model, "
      f"optimiser or an older eqattn): delete it or train with "
      f"resume=False ({e})"
    ) from None


# ``potentials.io.load``/``save``, deprecated (removed in 0.3): they moved to
# ``potentials.load``/``save`` (:mod:`potentials.potential`), so that this module needs nothing
# of the model. The package fills this table, so this module imports nothing of the model.
DEPRECATED: dict = {}


def __getattr__(name: str):
  if name in DEPRECATED:
    import warnings

    warnings.warn(
      f"potentials.io.{name} is deprecated (removed in 0.3), use potentials.{name}",
      DeprecationWarning,
      stacklevel=2,
    )
    return DEPRECATED[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
