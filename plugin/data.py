"""Training data from any ASE-readable file: labelled frames with their pair lists."""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from potentials.electrostatics import checked_charge
from potentials.training import Frame

from .neighbors import neighbor_pairs_from_atoms


def _label(atoms: Atoms, name: str):
  """A reference label from the attached (single-point) calculator, or None if absent."""
  if atoms.calc is None:
    return None
  try:
    if name == "energy":
      return float(atoms.get_potential_energy())
    if name == "forces":
      return np.asarray(atoms.get_forces(), np.float64)
    if name == "stress":
      if not np.all(atoms.pbc):
        return None
      return np.asarray(atoms.get_stress(voigt=False), np.float64)
  except (PropertyNotImplementedError, RuntimeError, KeyError):
    return None
  return None


def _tag(atoms: Atoms, key: str, kind):
  value = atoms.info.get(key)
  return None if value is None else kind(value)


def frame_from_atoms(atoms: Atoms, cutoff: float, charge: float = 0.0) -> Frame:
  """One :class:`potentials.training.Frame` (labels from ``atoms.calc``, pairs within cutoff;
  ``info`` keys ``trajectory``, ``config_type`` and ``temperature_K`` tag it for held-out
  splits; ``info["charge"]`` is its total charge, else ``charge``)."""
  dst, src, shifts = neighbor_pairs_from_atoms(atoms, cutoff)
  return Frame(
    numbers=np.asarray(atoms.numbers),
    positions=np.asarray(atoms.positions, float),
    cell=np.asarray(atoms.cell[:], float),
    pbc=np.asarray(atoms.pbc, bool),
    dst=dst,
    src=src,
    shifts=np.asarray(shifts, float),
    energy=_label(atoms, "energy"),
    forces=_label(atoms, "forces"),
    stress=_label(atoms, "stress"),
    trajectory=_tag(atoms, "trajectory", str),
    config_type=_tag(atoms, "config_type", str),
    temperature=_tag(atoms, "temperature_K", float),
    charge=checked_charge(atoms.info.get("charge", charge), "info['charge']"),
  )


_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def read_images(path, index: Union[str, slice] = ":") -> List[Atoms]:
  """``ase.io.read(path, index)`` as a list. A compressed (x)yz file is decompressed into
  memory first: ASE's reader seeks back in it once per frame, and each backward seek in a
  compressed stream decompresses from the start (a 1680-frame .extxyz.gz: 50 s, not 1 s)."""
  import importlib
  import io
  from pathlib import Path

  from ase.io import read
  from ase.io.formats import filetype

  path = Path(path)
  module = _OPENERS.get(path.suffix)
  fmt = filetype(str(path), read=False) if module else None
  if fmt in ("extxyz", "xyz"):
    with importlib.import_module(module).open(path, "rt") as fh:
      images = read(io.StringIO(fh.read()), index=index, format=fmt)
  else:
    images = read(path, index=index)
  return images if isinstance(images, list) else [images]


def read_frames(
  source: Union[str, Sequence[Atoms]],
  cutoff: float,
  index: Union[str, slice] = ":",
  *,
  charge: float = 0.0,
) -> List[Frame]:
  """Read labelled frames from a file (extxyz, ASE db, traj, ...) or a list of Atoms
  (``charge``: the total charge of frames whose ``info`` has none)."""
  if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
    images = read_images(source, index)
  else:
    images = list(source)
  if not images:
    raise ValueError(f"no structures in {source!r}")
  frames = [frame_from_atoms(a, cutoff, charge) for a in images]
  if not any(f.energy is not None or f.forces is not None for f in frames):
    raise ValueError(f"{source!r} has no energy or force labels to train on")
  return frames
