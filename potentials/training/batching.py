"""Labelled frames and their packing into fixed-capacity padded batches.

A :class:`Frame` is neutral data (atomic numbers, positions, cell, periodicity, reference
labels) with its pair list already built (``plugin.data`` reads any ASE-readable file and
builds them). Frames are packed into one padded system per batch (:func:`make_batch`), with a
capacity that fits any batch of the set, so a whole run compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np

from .. import electrostatics
from ..potential import Potential


@dataclasses.dataclass
class Frame:
  """One labelled structure with its full pair list (``r = R[src] - R[dst] + shifts @ cell``).

  ``energy`` in eV, ``forces`` (N, 3) eV/Å, ``stress`` (3, 3) eV/Å^3 in ASE's sign convention
  (``(1/V) dE/dε``) or None where not labelled.
  """

  numbers: np.ndarray
  positions: np.ndarray
  cell: np.ndarray
  pbc: np.ndarray
  dst: np.ndarray
  src: np.ndarray
  shifts: np.ndarray
  energy: Optional[float] = None
  forces: Optional[np.ndarray] = None
  stress: Optional[np.ndarray] = None
  trajectory: Optional[str] = None  # id of the MD run the frame came from (held-out splits)
  config_type: Optional[str] = None  # kind of structure; splits are stratified by it
  temperature: Optional[float] = None  # thermostat target (K), to stratify and report by
  charge: float = 0.0  # total charge (e), what a model's learnt charges sum to

  @property
  def periodic(self) -> bool:
    return bool(np.all(self.pbc))

  @property
  def num_atoms(self) -> int:
    return len(self.numbers)

  @property
  def volume(self) -> float:
    return abs(float(np.linalg.det(self.cell))) if np.all(self.pbc) else 0.0


@dataclasses.dataclass
class Batch:
  """Frames packed into one padded system (numpy; moved to the device per step)."""

  species: np.ndarray  # (A,) int32
  positions: np.ndarray  # (A, 3)
  atom_frame: np.ndarray  # (A,) frame slot of each atom; padding -> B
  atom_mask: np.ndarray  # (A,) bool
  dst: np.ndarray  # (E,) int32, padding = A
  src: np.ndarray
  shifts: np.ndarray  # (E, 3)
  pair_frame: np.ndarray  # (E,) frame slot of each pair's centre
  cells: np.ndarray  # (B, 3, 3)
  volumes: np.ndarray  # (B,) 0 for non-periodic
  num_atoms: np.ndarray  # (B,) 0 for empty slots
  energy: np.ndarray  # (B,)
  forces: np.ndarray  # (A, 3)
  stress: np.ndarray  # (B, 3, 3)
  has_energy: np.ndarray  # (B,) bool
  has_forces: np.ndarray  # (A,) bool
  has_stress: np.ndarray  # (B,) bool
  total_charge: np.ndarray  # (B,)
  periodic: np.ndarray  # (B,) bool: fully periodic
  kvectors: np.ndarray  # (B, K, 3) int32 reciprocal indices (K = 0 without electrostatics)
  kmask: np.ndarray  # (B, K) bool


def batch_capacity(frames: Sequence[Frame], batch_size: int) -> Tuple[int, int]:
  """Atom and pair capacity that fits any ``batch_size`` frames of this set."""
  atoms = sorted((f.num_atoms for f in frames), reverse=True)[:batch_size]
  pairs = sorted((len(f.dst) for f in frames), reverse=True)[:batch_size]
  return int(sum(atoms)) + 1, int(sum(pairs)) + 1


# padded pairs whose evaluation costs less than one compilation (~60k pairs/s evaluated on
# one core against ~15-20 s to compile a program)
FREE_PAIRS = 500_000


def bucket(n: int) -> int:
  """The shape bucket of a size ``n``: the next of 8, 12, 16, 24, 32, 48, ... (powers of two
  and their 1.5 multiples), so padded shapes, i.e. compilations, are few and padding < 50 %."""
  size = 8
  while size < n:
    size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
  return size


def buckets(
  frames: Sequence[Frame], max_frames: int, max_atoms: int
) -> List[Tuple[List[int], Tuple[int, int, int]]]:
  """Batches for evaluating many structures of varied sizes: ``(frame indices, (frames,
  atoms, pairs) capacity)`` each. Frames sorted by size are packed greedily (at most
  ``max_frames`` frames and ``max_atoms`` atoms; a larger frame goes alone), and every capacity
  is rounded up to a :func:`bucket`, so thousands of structures compile a handful of shapes."""
  order = sorted(range(len(frames)), key=lambda i: (frames[i].num_atoms, len(frames[i].dst)))
  groups: List[List[int]] = []
  atoms = 0
  for i in order:
    n = frames[i].num_atoms
    if not groups or len(groups[-1]) >= max_frames or atoms + n > max_atoms:
      groups.append([])
      atoms = 0
    groups[-1].append(i)
    atoms += n
  caps = [
    (
      bucket(len(g)),
      bucket(sum(frames[i].num_atoms for i in g) + 1),
      bucket(sum(len(frames[i].dst) for i in g) + 1),
    )
    for g in groups
  ]
  # frames of alike sizes (a training set's parts): every batch in the shape of full batches
  # of the largest frame, so the set compiles once and so do other sets like it. A
  # compilation costs as much as hundreds of batches (~20 s for an alloy on one core), so
  # padding up to twice the work pays, and any padding while the whole set stays under
  # FREE_PAIRS (small molecules of varied sizes: 12 shapes, ~200 s of compilation, for
  # 1300 GFN2-xTB dimers of 3 to 12 atoms)
  if frames:
    n = max(f.num_atoms for f in frames)
    per = min(max_frames, max(1, max_atoms // max(n, 1)))
    pairs = max(len(f.dst) for f in frames)
    full = (bucket(per), bucket(per * n + 1), bucket(per * pairs + 1))
    padded = len(groups) * full[2]
    if padded <= max(2 * sum(c[2] for c in caps), FREE_PAIRS):
      caps = [full] * len(groups)
  return list(zip(groups, caps))


def kvector_capacity(frames: Sequence[Frame], potential: Potential) -> int:
  """Reciprocal vectors a batch of these frames needs per frame (0 without electrostatics):
  the most any periodic frame needs, rounded up to a :func:`bucket`."""
  cfg = potential.config
  cells = [f.cell for f in frames if cfg.electrostatics and f.periodic]
  if not cells:
    return 0
  table, _ = electrostatics.kvector_table(cells, True, cfg.cutoff, cfg.ewald_accuracy)
  return bucket(table.shape[1])


def make_batch(
  frames: Sequence[Frame],
  potential: Potential,
  batch_size: int,
  atom_capacity: int,
  pair_capacity: int,
  kvectors: Optional[int] = None,
) -> Batch:
  """Pack up to ``batch_size`` frames into one padded system (``kvectors``: reciprocal
  vectors per frame of a model with electrostatics, default :func:`kvector_capacity`)."""
  A, E, B = atom_capacity, pair_capacity, batch_size
  K = kvector_capacity(frames, potential) if kvectors is None else kvectors
  b = Batch(
    species=np.zeros(A, np.int32),
    positions=np.zeros((A, 3)),
    atom_frame=np.full(A, B, np.int32),
    atom_mask=np.zeros(A, bool),
    dst=np.full(E, A, np.int32),
    src=np.full(E, A, np.int32),
    shifts=np.zeros((E, 3)),
    pair_frame=np.full(E, B, np.int32),
    cells=np.zeros((B, 3, 3)),
    volumes=np.zeros(B),
    num_atoms=np.zeros(B),
    energy=np.zeros(B),
    forces=np.zeros((A, 3)),
    stress=np.zeros((B, 3, 3)),
    has_energy=np.zeros(B, bool),
    has_forces=np.zeros(A, bool),
    has_stress=np.zeros(B, bool),
    total_charge=np.zeros(B),
    periodic=np.zeros(B, bool),
    kvectors=np.zeros((B, K, 3), np.int32),
    kmask=np.zeros((B, K), bool),
  )
  a = e = 0
  for k, f in enumerate(frames):
    n, m = f.num_atoms, len(f.dst)
    if a + n > A or e + m > E:
      raise ValueError("batch capacity exceeded")
    sl, pl = slice(a, a + n), slice(e, e + m)
    b.species[sl] = potential.species_index(f.numbers)
    b.positions[sl] = f.positions
    b.atom_frame[sl] = k
    b.atom_mask[sl] = True
    b.dst[pl], b.src[pl] = f.dst + a, f.src + a
    b.shifts[pl] = f.shifts
    b.pair_frame[pl] = k
    b.cells[k] = f.cell
    b.volumes[k] = f.volume
    b.num_atoms[k] = n
    if f.energy is not None:
      b.energy[k], b.has_energy[k] = f.energy, True
    if f.forces is not None:
      b.forces[sl], b.has_forces[sl] = f.forces, True
    if f.stress is not None and f.volume > 0:
      b.stress[k], b.has_stress[k] = f.stress, True
    b.total_charge[k], b.periodic[k] = f.charge, f.periodic
    a, e = a + n, e + m
  if K:
    cfg = potential.config
    table, mask = electrostatics.kvector_table(
      b.cells, b.periodic, cfg.cutoff, cfg.ewald_accuracy, capacity=K
    )
    b.kvectors[:], b.kmask[:] = table, mask
  return b


def device_batch(b: Batch, dtype) -> dict:
  """The batch as a dict of device arrays, floating-point fields in ``dtype``: cast on the
  host and sent in one transfer (a conversion and transfer per field took 4x as long, ~5 ms
  of a 23 ms training step on ethanol)."""
  dtype = np.dtype(dtype)
  host = {}
  for field in dataclasses.fields(b):
    v = np.asarray(getattr(b, field.name))
    host[field.name] = v.astype(dtype, copy=False) if v.dtype.kind == "f" else v
  return jax.device_put(host)


_device_batch = device_batch  # old name
