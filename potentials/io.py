"""Model files: one self-describing, non-executable file per model.

Layout::

    b"EQATTN-MODEL\\n"        magic (13 bytes)
    uint32 little-endian      format version
    uint64 little-endian      payload length in bytes
    32 bytes                  SHA-256 of the payload
    payload                   msgpack (flax.serialization) of
                              {format_version, config, species, cutoff, units, metadata, params}

msgpack decoding builds only dicts, lists, numbers, strings and NumPy arrays, so loading a
file cannot run code (no pickle anywhere). Truncation and corruption are caught by the length
and the checksum before anything is decoded; wrong versions and non-model files by the header.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Any, Union

import jax
import numpy as np
from flax import serialization

from .model import ModelConfig
from .potential import Potential

MAGIC = b"EQATTN-MODEL\n"
FORMAT_VERSION = 1
SUFFIX = ".eqm"
UNITS = {"energy": "eV", "length": "Angstrom", "mass": "amu"}
_HEADER = struct.Struct("<IQ32s")


class ModelFileError(ValueError):
  """A file that is not a readable eqattn model."""


def _plain(value: Any, where: str = "metadata"):
  """Check that metadata is JSON-like (so files stay portable and inspectable)."""
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where} must hold only JSON-like values (str, numbers, lists, dicts): "
                     f"{e}") from None
  return value


def save(potential: Potential, path: Union[str, os.PathLike]) -> None:
  """Write ``potential`` to ``path`` atomically (a crash never leaves a half-written file)."""
  params = jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(potential.params))
  payload = serialization.msgpack_serialize({
      "format_version": FORMAT_VERSION,
      "config": potential.config.to_dict(),
      "species": list(potential.species),
      "cutoff": potential.cutoff,
      "units": UNITS,
      "metadata": _plain(dict(potential.metadata)),
      "params": params,
  })
  header = MAGIC + _HEADER.pack(FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(header + payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def shipped_models() -> dict:
  """Names of the models shipped with the package -> their paths."""
  folder = resources.files("potentials") / "models"
  if not folder.is_dir():
    return {}
  return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(SUFFIX)}


def _resolve(name_or_path) -> Path:
  path = Path(name_or_path)
  if path.is_file():
    return path
  shipped = shipped_models()
  if str(name_or_path) in shipped:
    return shipped[str(name_or_path)]
  names = ", ".join(sorted(shipped)) or "none"
  raise FileNotFoundError(f"no model file {str(name_or_path)!r} and no shipped model of that name "
                          f"(shipped models: {names})")


def _check_params(params: Any, reference: Any, path: Path) -> Any:
  ref_flat = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(reference)[0]}
  got_flat = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(ref_flat) != set(got_flat):
    missing = sorted(set(ref_flat) - set(got_flat))[:3]
    extra = sorted(set(got_flat) - set(ref_flat))[:3]
    raise ModelFileError(f"{path}: parameters do not match the model config "
                         f"(missing {missing}, unexpected {extra})")
  for k, ref in ref_flat.items():
    got = got_flat[k]
    if not isinstance(got, np.ndarray) or got.shape != ref.shape or got.dtype != ref.dtype:
      raise ModelFileError(f"{path}: parameter {k} has shape/dtype "
                           f"{getattr(got, 'shape', None)}/{getattr(got, 'dtype', type(got))}, "
                           f"expected {ref.shape}/{ref.dtype}")
  return serialization.from_state_dict(reference, params)


def load(name_or_path: Union[str, os.PathLike]) -> Potential:
  """Load a model file, or a shipped model by name (e.g. ``load("ethanol")``)."""
  path = _resolve(name_or_path)
  data = path.read_bytes()
  if not data.startswith(MAGIC):
    raise ModelFileError(f"{path} is not an eqattn model file (no {MAGIC!r} header)")
  if len(data) < len(MAGIC) + _HEADER.size:
    raise ModelFileError(f"{path} is truncated (incomplete header)")
  version, length, digest = _HEADER.unpack_from(data, len(MAGIC))
  if version != FORMAT_VERSION:
    raise ModelFileError(f"{path} has model format version {version}; this eqattn reads "
                         f"version {FORMAT_VERSION} (upgrade eqattn or re-export the model)")
  payload = data[len(MAGIC) + _HEADER.size:]
  if len(payload) != length:
    raise ModelFileError(f"{path} is truncated or has trailing data: payload is "
                         f"{len(payload)} bytes, header says {length}")
  if hashlib.sha256(payload).digest() != digest:
    raise ModelFileError(f"{path} is corrupt (checksum mismatch)")
  try:
    content = serialization.msgpack_restore(payload)
  except Exception as e:  # a valid checksum over undecodable bytes: written by something else
    raise ModelFileError(f"{path}: payload cannot be decoded ({e})") from None
  keys = {"format_version", "config", "species", "cutoff", "units", "metadata", "params"}
  if not isinstance(content, dict) or not keys <= set(content):
    raise ModelFileError(f"{path}: missing fields {sorted(keys - set(content or {}))}")
  if content["units"] != UNITS:
    raise ModelFileError(f"{path}: units {content['units']} are not {UNITS}")
  try:
    config = ModelConfig.from_dict(dict(content["config"]))
  except (TypeError, ValueError) as e:
    raise ModelFileError(f"{path}: bad model config: {e}") from None
  species = tuple(int(z) for z in content["species"])
  if abs(float(content["cutoff"]) - config.cutoff) > 0:
    raise ModelFileError(f"{path}: cutoff {content['cutoff']} disagrees with config")
  reference = jax.eval_shape(lambda: Potential.create(0, species=species,
                                                      **config.to_dict()).params)
  reference = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), reference)
  params = _check_params(content["params"], reference, path)
  params = jax.tree_util.tree_map(np.asarray, params)
  return Potential(config, species, params, dict(content["metadata"]))
