"""Neighbour lists for the ASE side: full directed pair lists, padded to capacity buckets.

Conventions (``docs/conventions.md``)
-------------------------------------
* A pair ``k`` is directed: ``dst[k]`` is the centre ``i`` (it receives the message), ``src[k]``
  the neighbour ``j``, and the pair vector is ::

      r_k = R[src[k]] - R[dst[k]] + shifts[k] @ cell

  with ``shifts[k]`` an integer cell-image vector (zero along non-periodic directions).
* The list is *full*: ``(i, j, S)`` and ``(j, i, -S)`` are both present. It holds every pair with
  ``|r_k| < cutoff`` (strictly less), never the zero-distance self pair ``(i, i, 0)``, and it does
  hold an atom's own periodic images ``(i, i, S != 0)`` when they are closer than the cutoff, so
  cells smaller than twice the cutoff are handled exactly.
* Pairs are sorted by ``dst`` (stable), so a JAX ``segment_sum(..., dst, num_segments=N,
  indices_are_sorted=True)`` is valid. Padding (``pad_pairs``) appends ``dst = src = N``, which
  keeps the order sorted. Indices are ``int32``.
* Shifts are returned as float64 by default (ready for ``shifts @ cell``), or any dtype asked for.

The pair search itself is done by `vesin <https://github.com/Luthaf/vesin>`_ (cell list, C++).
This module adds input validation and works around the places where vesin 0.6.2 is not safe on
its own (found while writing this module; each has a regression test in tests/test_neighbors.py):

1. **Open and mixed boundaries.** With mixed pbc, vesin's search time grows with the square of
   the number of grid cells along the open directions (a slab with a molecule 1000 Å above it:
   seconds; 1e5 Å: hours). So vesin only ever gets a *fully periodic* box here: every open
   direction gets an artificial cell vector, perpendicular to all periodic vectors and longer than
   the atoms' extent plus 1.5 cutoffs, so no periodic image of it is ever in range and the
   returned shifts are zero along open directions. When the atoms span more than 100 cutoffs
   along an open direction, empty gaps wider than 2 cutoffs are first closed up (whole clusters
   are moved perpendicular to every periodic vector, which changes neither the pair set nor the
   shifts).
2. **Cell-grid overflow -> process crash.** Vesin caps its grid at 1e5 cells by shrinking it;
   for strongly anisotropic grids (a wide, thin periodic slab; an atom ~1e5 cutoffs away from a
   molecule) one grid dimension is truncated to 0 and the process dies with SIGFPE - no Python
   exception. We predict vesin's grid before calling it; if it would break, we close gaps (as in
   1.) and, if still needed, search with a larger cutoff and filter back down to the true one.
3. **Huge unwrapped coordinates.** Vesin computes cell indices in int32; atoms ~1e10 Å outside a
   periodic cell silently lose pairs. When some atom is more than 1000 cell lengths out, we wrap
   positions into the cell along periodic directions before the search and correct the returned
   shifts, so shifts are always relative to the positions the caller passed.
4. **Periodic direction with a zero / degenerate cell vector.** Vesin raises a terse
   ``RuntimeError``, returns too few pairs (nearly singular) or crashes with SIGFPE (mixed pbc).
   We check first and raise ``ValueError``; so are NaN/inf positions and bad cutoffs.

All of these are exact: the pair set is the one of the positions the caller passed (up to
floating-point rounding of translated coordinates, ~1e-16 relative).

Order within one ``dst`` follows vesin's output and was found identical for 1, 2 and 8 threads.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
import vesin

__all__ = [
  "neighbor_pairs",
  "neighbor_pairs_from_atoms",
  "bucket_capacity",
  "pad_pairs",
  "PaddedPairs",
  "NeighborListBuilder",
]

# Vesin's CPU cell list (cpu_cell_list.cpp) shrinks its grid when it has more than this many cells.
_VESIN_MAX_CELLS = 1e5
# Open directions are searched as periodic ones with a box this many (search) cutoffs wider than
# the atoms' extent, so that periodic images are always out of range.
_OPEN_PADDING = 1.5
# Empty gaps along open directions are closed up when the atoms span more than this many cutoffs.
_COMPRESS_BEYOND = 100.0
# A periodic direction whose images are closer than cutoff / _MAX_IMAGES_PER_CUTOFF is rejected
# as (nearly) singular: it would need that many images along one axis, beyond what vesin's int32
# cell arithmetic handles correctly, and is never a physical cell.
_MAX_IMAGES_PER_CUTOFF = 1e5
# Atoms more than this many cell lengths outside the cell are wrapped before the search.
_WRAP_BEYOND = 1000.0
# Vesin refuses cutoffs at or below this value.
_MIN_CUTOFF = 1e-6


# --------------------------------------------------------------------------------------------
# validation


def _as_positions(positions: Any) -> np.ndarray:
  if np.iscomplexobj(positions):
    raise ValueError("positions must be real, got a complex array")
  try:
    pos = np.asarray(positions, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(
      f"positions must be a real array of shape (N, 3), got {type(positions).__name__} "
      f"that cannot be converted to float64 ({err})"
    ) from None
  if pos.ndim != 2 or pos.shape[1] != 3:
    raise ValueError(
      f"positions must have shape (N, 3), got shape {pos.shape}; pass one row of x, y, z "
      "coordinates (Å) per atom (use np.zeros((0, 3)) for an empty system)"
    )
  finite = np.isfinite(pos).all(axis=1)
  if not finite.all():
    bad = int(np.argmin(finite))
    raise ValueError(
      f"positions of atom {bad} are not finite ({pos[bad].tolist()}); "
      f"{int((~finite).sum())} atom(s) have NaN/inf coordinates. The structure probably blew "
      "up (check the time step and forces) or was read incorrectly."
    )
  return pos


def _as_pbc(pbc: Any) -> np.ndarray:
  arr = np.asarray(pbc)
  if arr.dtype.kind not in "biu" or (arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all()):
    raise ValueError(f"pbc must be booleans (one or three), got {pbc!r}")
  if arr.shape == ():
    arr = np.repeat(arr, 3)
  if arr.shape != (3,):
    raise ValueError(f"pbc must be a single bool or three bools, got shape {arr.shape}")
  return arr.astype(bool)


def _as_cell(cell: Any, pbc: np.ndarray) -> np.ndarray:
  if cell is None:
    if pbc.any():
      raise ValueError("cell is None but pbc is periodic; give the 3x3 cell (rows = vectors)")
    return np.zeros((3, 3))
  try:
    c = np.asarray(cell, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"cell must be a real 3x3 array, got {type(cell).__name__} ({err})") from None
  if c.shape == (3,):
    c = np.diag(c)
  if c.shape != (3, 3):
    raise ValueError(
      f"cell must have shape (3, 3) (rows are the cell vectors, Å) or (3,) for an "
      f"orthorhombic cell, got shape {c.shape}"
    )
  if not np.isfinite(c).all():
    raise ValueError(f"cell contains NaN/inf: {c.tolist()}")
  return c


def _periodic_heights(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
  """Distance between neighbouring lattice planes along each periodic direction.

  For periodic vector ``a_k`` this is the length of its component orthogonal to the other
  *periodic* vectors (non-periodic rows are ignored). It is what vesin calls the distance between
  faces, and it is ``0`` for a zero-length or linearly dependent vector. NaN for open axes.
  """
  heights = np.full(3, np.nan)
  idx = np.flatnonzero(pbc)
  for k in idx:
    others = cell[[o for o in idx if o != k]]
    a = cell[k]
    if len(others):
      # project out the span of the other periodic vectors (least squares, robust to
      # dependent "others" as well)
      coef, *_ = np.linalg.lstsq(others.T, a, rcond=None)
      a = a - others.T @ coef
    heights[k] = float(np.linalg.norm(a))
  return heights


def _check_cell(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
  heights = _periodic_heights(cell, pbc)
  for k in np.flatnonzero(pbc):
    length = float(np.linalg.norm(cell[k]))
    if length == 0.0:
      suggestion = [bool(p and i != k) for i, p in enumerate(pbc)]
      raise ValueError(
        f"cell vector {k} has zero length but pbc[{k}] is True; give the real cell or set "
        f"pbc[{k}] = False (e.g. atoms.pbc = {suggestion})"
      )
    if not heights[k] * _MAX_IMAGES_PER_CUTOFF > cutoff or heights[k] <= 1e-10 * length:
      raise ValueError(
        f"the cell is singular or nearly so along periodic direction {k}: its lattice "
        f"planes are only {heights[k]:.3g} Å apart (cutoff {cutoff:g} Å), i.e. cell "
        f"vector {k} = {cell[k].tolist()} is (almost) zero or (almost) in the span of the "
        "other periodic vectors. Check the cell (rows are the cell vectors) or make that "
        "direction non-periodic."
      )
  return heights


def _check_cutoff(cutoff: Any) -> float:
  try:
    rc = float(cutoff)
  except (TypeError, ValueError):
    raise ValueError(f"cutoff must be a number (Å), got {cutoff!r}") from None
  if not math.isfinite(rc) or rc <= _MIN_CUTOFF:
    raise ValueError(f"cutoff must be a finite number > {_MIN_CUTOFF:g} Å, got {cutoff!r}")
  return rc


# --------------------------------------------------------------------------------------------
# vesin safety net


def _grid_is_safe(n: tuple[float, float, float]) -> bool:
  """Whether vesin's grid shrinking keeps every dimension >= 1 (with a wide margin)."""
  n0, n1, n2 = n
  if n0 * n1 * n2 <= _VESIN_MAX_CELLS:
    return True
  # vesin: n2' = trunc(cbrt(MAX / (rxy * ryz^2))), n1' = trunc(ryz n2'), n0' = trunc(rxy n1').
  # Without the truncations these are x2, x1, x0 below; if all are >= 4 the truncated values are
  # >= 1 (each truncation loses less than half), so the grid is valid.
  x2 = np.cbrt(_VESIN_MAX_CELLS * n2 * n2 / (n0 * n1))
  x1 = x2 * n1 / n2
  x0 = x1 * n0 / n1
  return min(x0, x1, x2) >= 4.0


def _vesin_is_safe(d: np.ndarray, search_cutoff: float) -> bool:
  """Whether vesin's cell list for a periodic box with plane spacings ``d`` is sound."""
  # vesin uses max(1, trunc(d / cutoff)) cells per direction; when d / cutoff is (almost) an
  # integer, try both roundings
  options = []
  for dk in d:
    lo = max(1.0, math.trunc(dk * (1 - 1e-6) / search_cutoff))
    hi = max(1.0, math.trunc(dk * (1 + 1e-6) / search_cutoff))
    options.append({lo, hi})
  return all(_grid_is_safe(n) for n in itertools.product(*options))


def _open_directions(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
  """Orthonormal directions perpendicular to every periodic cell vector, shape (3 - rank, 3)."""
  periodic = cell[pbc]
  if len(periodic) == 0:
    return np.eye(3)
  _, _, vt = np.linalg.svd(periodic)
  return vt[len(periodic) :]


def _close_gaps(positions: np.ndarray, directions: np.ndarray, gap: float) -> np.ndarray:
  """Shrink every empty slab wider than ``gap`` along each direction down to ``gap``.

  Atoms are moved only along ``directions`` (perpendicular to the periodic vectors), and by the
  same amount within each cluster, so pair vectors inside a cluster are unchanged and no pair can
  form across a closed-up gap (it stays wider than the cutoff). Pairs and shifts are therefore
  exactly those of the original positions.
  """
  out = positions.copy()
  for e in directions:
    u = out @ e
    order = np.argsort(u, kind="stable")
    excess = np.maximum(np.diff(u[order]) - gap, 0.0)
    if not excess.any():
      continue
    moved = np.empty_like(u)
    moved[order] = np.concatenate([[0.0], np.cumsum(excess)])
    out -= moved[:, None] * e[None, :]
  return out


def _wrap_far_atoms(
  positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
  """Wrap positions into the cell along periodic directions, ``R_w = R - n @ cell``, if needed.

  Vesin handles atoms a few cells outside the box, but its int32 cell indices overflow for atoms
  very far away. Wrapping changes the shifts it returns (corrected by the caller with ``n``), and
  that correction costs a few ms per million pairs, so it is only done when some atom is more
  than ``_WRAP_BEYOND`` cell lengths out. Returns ``(positions, n)`` with ``n`` ``(N, 3)`` int64,
  or ``(positions, None)`` when nothing was done.
  """
  if not pbc.any() or len(positions) == 0:
    return positions, None
  periodic = cell[pbc]
  frac = positions @ np.linalg.pinv(periodic)  # (N, n_periodic); exact for periodic directions
  if np.abs(frac).max() <= _WRAP_BEYOND:
    return positions, None
  n = np.zeros((len(positions), 3), dtype=np.int64)
  n[:, pbc] = np.floor(frac).astype(np.int64)
  return positions - n[:, pbc].astype(np.float64) @ periodic, n


def _stable_order(keys: np.ndarray, num_atoms: int) -> np.ndarray:
  """``np.argsort(keys, kind="stable")`` for int32 keys in ``[0, num_atoms)``."""
  if num_atoms <= 1 << 16:
    # numpy uses a radix sort for 16-bit keys: ~2x faster than the default stable sort
    return np.argsort(keys.astype(np.uint16), kind="stable")
  return np.argsort(keys, kind="stable")


# --------------------------------------------------------------------------------------------
# public API


def neighbor_pairs(
  positions: Any,
  cell: Any,
  pbc: Any,
  cutoff: float,
  *,
  shift_dtype: Any = np.float64,
  n_threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Full directed pair list of all pairs closer than ``cutoff``, sorted by ``dst``.

  Args:
      positions: ``(N, 3)`` Cartesian positions (Å). They need not be wrapped into the cell.
      cell: ``(3, 3)`` cell, rows are the cell vectors (an ``ase.cell.Cell`` works), or ``(3,)``
          lengths of an orthorhombic cell, or ``None`` for a fully open system. Rows of
          non-periodic directions are ignored (they may be zero, but must be finite).
      pbc: a bool or three bools, periodicity along each cell vector.
      cutoff: cutoff radius (Å), > 0. Pairs with distance ``< cutoff`` are returned.
      shift_dtype: dtype of the returned shifts (float64 by default; pass np.int32 for integers).
      n_threads: threads for vesin; 0 = vesin's default (``OMP_NUM_THREADS`` or all cores).

  Returns:
      ``(dst, src, shifts)``: ``dst`` and ``src`` are ``(P,)`` int32, ``shifts`` is ``(P, 3)``
      of ``shift_dtype``, where ``P`` is the number of directed pairs. The pair vector is
      ``positions[src] - positions[dst] + shifts @ cell``. Sorted by ``dst`` (stable). Every
      pair appears in both directions; an atom's own periodic images (``dst == src``, non-zero
      shift) are included when closer than the cutoff, ``(i, i, 0)`` never; shifts are zero
      along non-periodic directions.

  Raises:
      ValueError: wrong shapes, NaN/inf positions (the first bad atom is named), non-positive
          cutoff, or a periodic direction whose cell vector is zero or (nearly) linearly
          dependent on the other periodic vectors.
  """
  rc = _check_cutoff(cutoff)
  pos = _as_positions(positions)
  pbc_ = _as_pbc(pbc)
  cell_ = _as_cell(cell, pbc_)
  heights = _check_cell(cell_, pbc_, rc)
  return _search(pos, cell_, pbc_, heights, rc, np.dtype(shift_dtype), n_threads, None)


def neighbor_pairs_from_atoms(
  atoms: Any, cutoff: float, *, shift_dtype: Any = np.float64, n_threads: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`neighbor_pairs` for an ``ase.Atoms`` (positions, cell and pbc taken from it)."""
  return neighbor_pairs(
    atoms.get_positions(),
    atoms.get_cell().array,
    atoms.get_pbc(),
    cutoff,
    shift_dtype=shift_dtype,
    n_threads=n_threads,
  )


def _search(
  pos: np.ndarray,
  cell: np.ndarray,
  pbc: np.ndarray,
  heights: np.ndarray,
  rc: float,
  shift_dtype: np.dtype,
  n_threads: int,
  cache: dict | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated inputs -> sorted pair list (see `neighbor_pairs`)."""
  num_atoms = len(pos)
  if num_atoms >= np.iinfo(np.int32).max:
    raise ValueError(f"{num_atoms} atoms do not fit int32 indices")
  if num_atoms == 0:
    return (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 3), shift_dtype))

  wrapped, image = _wrap_far_atoms(pos, cell, pbc)

  # Vesin only ever sees a fully periodic box (see module docstring, points 1 and 2). Open
  # directions get artificial cell vectors along unit vectors `dirs` perpendicular to every
  # periodic vector, longer than the atoms' extent plus the search cutoff, so that no pair can
  # involve an artificial image.
  box = cell.copy()
  spacing = heights.copy()
  open_idx = np.flatnonzero(~pbc)
  dirs = _open_directions(cell, pbc)
  extent = np.zeros(len(open_idx))

  def fit(search_rc: float) -> bool:
    length = extent + _OPEN_PADDING * search_rc
    box[open_idx] = length[:, None] * dirs
    spacing[open_idx] = length
    return _vesin_is_safe(spacing, search_rc)

  if len(open_idx):
    u = wrapped @ dirs.T
    extent = np.ptp(u, axis=0)
    if extent.max() > _COMPRESS_BEYOND * rc or not fit(rc):
      wrapped = _close_gaps(wrapped, dirs, 2.0 * rc)
      u = wrapped @ dirs.T
      extent = np.ptp(u, axis=0)
    # put the atoms inside the box along the open directions
    wrapped = wrapped - u.min(axis=0) @ dirs
  search_rc = rc
  while not fit(search_rc):
    search_rc *= 1.25  # grid vesin cannot handle even after compression: widen the search

  key = (search_rc, n_threads)
  nl = cache.get(key) if cache is not None else None
  if nl is None:
    threads = {"n_threads": n_threads} if n_threads else {}  # only when asked for
    nl = vesin.NeighborList(cutoff=search_rc, full_list=True, sorted=False, **threads)
    if cache is not None:
      cache.clear()
      cache[key] = nl
  # copy=False: views into vesin's buffers, valid while `nl` is alive and not reused; every
  # array returned below is a fresh copy.
  if search_rc != rc:
    i, j, s, dist = nl.compute(wrapped, box, True, "ijSd", copy=False)
    keep = dist < rc
    i, j, s = i[keep], j[keep], s[keep]
  else:
    i, j, s = nl.compute(wrapped, box, True, "ijS", copy=False)
  if len(open_idx) and s[:, open_idx].any():  # impossible by construction of `box`
    raise RuntimeError("internal error: a pair crosses an open boundary; please report")

  dst = i.astype(np.int32)
  src = j.astype(np.int32)
  if len(dst) > 1 and not bool(np.all(dst[1:] >= dst[:-1])):
    order = _stable_order(dst, num_atoms)
    dst, src, s = dst[order], src[order], s[order]
  if image is not None:
    # r = Rw[j] - Rw[i] + Sw C = R[j] - R[i] + (Sw - n_j + n_i) C
    s = s.astype(np.int64) + image[dst] - image[src]
  return dst, src, s.astype(shift_dtype, copy=True)


def bucket_capacity(
  n: int, minimum: int = 64, growth: float = 1.25, headroom: float = 0.1, align: int = 8
) -> int:
  """Smallest value of a fixed geometric ladder that is ``>= n * (1 + headroom)``.

  The ladder is ``ceil_to_multiple(minimum * growth**k, align)`` for ``k = 0, 1, 2, ...``. It
  does not depend on ``n``, so the same pair counts always map to the same few capacities (and a
  jitted consumer sees the same few shapes). ``headroom`` keeps a margin so that a pair count that
  fluctuates around a ladder value does not force a regrow on the next step.

  Args:
      n: number of items (pairs) that must fit, ``>= 0``.
      minimum: smallest capacity returned (ladder rung 0), ``>= 1``.
      growth: ratio between successive rungs, ``> 1``.
      headroom: extra fraction required beyond ``n``, ``>= 0``.
      align: rungs are rounded up to a multiple of this, ``>= 1``.

  Returns:
      int capacity ``>= max(n * (1 + headroom), minimum)``.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if minimum < 1 or align < 1:
    raise ValueError(f"minimum and align must be >= 1, got {minimum}, {align}")
  if not growth > 1.0:
    raise ValueError(f"growth must be > 1, got {growth}")
  if not headroom >= 0.0:
    raise ValueError(f"headroom must be >= 0, got {headroom}")

  def rung(k: int) -> int:
    return int(math.ceil(minimum * growth**k / align)) * align

  target = math.ceil(n * (1.0 + headroom))
  if target <= rung(0):
    return rung(0)
  k = max(0, math.ceil(math.log(target / minimum) / math.log(growth)))
  while rung(k) < target:  # guard against floating-point error in the log estimate
    k += 1
  while k > 0 and rung(k - 1) >= target:
    k -= 1
  return rung(k)


def pad_pairs(
  dst: np.ndarray, src: np.ndarray, shifts: np.ndarray, capacity: int, num_atoms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pad a pair list to exactly ``capacity`` entries (JAX-MD convention).

  Args:
      dst, src: ``(P,)`` integer atom indices, ``P <= capacity``.
      shifts: ``(P, 3)`` cell-image shifts.
      capacity: length of the returned arrays.
      num_atoms: ``N``; padded pairs get ``dst = src = N`` and a zero shift.

  Returns:
      ``(dst, src, shifts)`` of shapes ``(capacity,)``, ``(capacity,)``, ``(capacity, 3)``;
      indices int32, shifts keep their dtype. Real pairs come first in their original order, so
      a ``dst``-sorted input stays sorted.
  """
  dst = np.asarray(dst)
  src = np.asarray(src)
  shifts = np.asarray(shifts)
  p = len(dst)
  if dst.ndim != 1 or src.shape != dst.shape or shifts.shape != (p, 3):
    raise ValueError(
      f"expected dst, src of shape (P,) and shifts of shape (P, 3), got {dst.shape}, "
      f"{src.shape}, {shifts.shape}"
    )
  if p > capacity:
    raise ValueError(
      f"{p} pairs do not fit capacity {capacity}; grow it (e.g. bucket_capacity({p})) or use "
      "NeighborListBuilder, which regrows automatically"
    )
  out_dst = np.full(capacity, num_atoms, dtype=np.int32)
  out_src = np.full(capacity, num_atoms, dtype=np.int32)
  out_shifts = np.zeros((capacity, 3), dtype=shifts.dtype)
  out_dst[:p] = dst
  out_src[:p] = src
  out_shifts[:p] = shifts
  return out_dst, out_src, out_shifts


class PaddedPairs(NamedTuple):
  """A padded pair list from `NeighborListBuilder.build`.

  Attributes:
      dst, src: ``(capacity,)`` int32; padding entries are ``num_atoms``.
      shifts: ``(capacity, 3)`` cell-image shifts; zero for padding.
      num_pairs: number of real pairs (they come first, sorted by ``dst``).
      capacity: ``len(dst)``.
      resized: True if this call changed the capacity (a jitted consumer will recompile).
  """

  dst: np.ndarray
  src: np.ndarray
  shifts: np.ndarray
  num_pairs: int
  capacity: int
  resized: bool


class NeighborListBuilder:
  """Builds padded pair lists for one cutoff, keeping the capacity stable across calls.

  The capacity is set from `bucket_capacity` on the first call, regrows geometrically only
  when the pair count exceeds it, and never shrinks unless `reset_capacity` is called. Every
  change (including the initial sizing) increments ``capacity_changes``, which therefore counts
  the pair-array shapes handed out: for a fixed number of atoms it is the number of compilations
  a jitted consumer needs, so tests can assert it stays small.

  Example::

      builder = NeighborListBuilder(cutoff=5.0)
      pairs = builder.build_from_atoms(atoms)
      energy = model(positions, pairs.dst, pairs.src, pairs.shifts @ cell)

  Attributes:
      cutoff: cutoff radius (Å).
      capacity: current capacity (``None`` before the first build).
      capacity_changes: how many times ``capacity`` took a new value.
      num_pairs: real pair count of the last build (``None`` before the first build).
  """

  def __init__(
    self,
    cutoff: float,
    *,
    minimum_capacity: int = 64,
    growth: float = 1.25,
    headroom: float = 0.1,
    shift_dtype: Any = np.float64,
    n_threads: int = 0,
  ) -> None:
    self.cutoff = _check_cutoff(cutoff)
    bucket_capacity(0, minimum_capacity, growth, headroom)  # validate the ladder parameters
    self.minimum_capacity = int(minimum_capacity)
    self.growth = float(growth)
    self.headroom = float(headroom)
    self.shift_dtype = np.dtype(shift_dtype)
    self.n_threads = int(n_threads)
    self.capacity: int | None = None
    self.capacity_changes = 0
    self.num_pairs: int | None = None
    self._vesin_cache: dict = {}
    self._refit = False

  def _bucket(self, n: int) -> int:
    return bucket_capacity(n, self.minimum_capacity, self.growth, self.headroom)

  def pairs(self, positions: Any, cell: Any, pbc: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpadded ``(dst, src, shifts)``, exactly as `neighbor_pairs` (reuses vesin's buffers)."""
    return self._pairs(positions, cell, pbc)[1:]

  def _pairs(
    self, positions: Any, cell: Any, pbc: Any
  ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    pos = _as_positions(positions)
    pbc_ = _as_pbc(pbc)
    cell_ = _as_cell(cell, pbc_)
    heights = _check_cell(cell_, pbc_, self.cutoff)
    dst, src, shifts = _search(
      pos, cell_, pbc_, heights, self.cutoff, self.shift_dtype, self.n_threads, self._vesin_cache
    )
    return len(pos), dst, src, shifts

  def build(
    self, positions: Any, cell: Any, pbc: Any, *, centres: int | None = None
  ) -> PaddedPairs:
    """Pair list for ``positions`` ``(N, 3)``, ``cell`` ``(3, 3)``, ``pbc``, padded to capacity.
    ``centres``: keep only the pairs centred on the first ``centres`` atoms (a domain
    decomposition's own atoms; the others are neighbours only).

    Raises the same ``ValueError``s as `neighbor_pairs`.
    """
    num_atoms, dst, src, shifts = self._pairs(positions, cell, pbc)
    if centres is not None:
      own = dst < centres  # the list is sorted by centre: it stays sorted
      dst, src, shifts = dst[own], src[own], shifts[own]
    n = len(dst)
    new = self.capacity
    if new is None or self._refit or n > new:
      new = self._bucket(n)
    self._refit = False
    resized = new != self.capacity
    if resized:
      self.capacity_changes += 1
    self.capacity = new
    self.num_pairs = n
    d, s, sh = pad_pairs(dst, src, shifts, new, num_atoms)
    return PaddedPairs(d, s, sh, n, new, resized)

  def build_from_atoms(self, atoms: Any) -> PaddedPairs:
    """`build` for an ``ase.Atoms``."""
    return self.build(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc())

  def reset_capacity(self, num_pairs: int | None = None) -> None:
    """Allow the capacity to shrink: refit it at the next build, or now to fit ``num_pairs``.

    This is the only way the capacity shrinks. A change counts in ``capacity_changes``.
    """
    if num_pairs is None:
      self._refit = True
      return
    new = self._bucket(int(num_pairs))
    if new != self.capacity:
      self.capacity = new
      self.capacity_changes += 1
    self._refit = False

  def __repr__(self) -> str:
    return (
      f"NeighborListBuilder(cutoff={self.cutoff}, capacity={self.capacity}, "
      f"capacity_changes={self.capacity_changes}, num_pairs={self.num_pairs})"
    )
