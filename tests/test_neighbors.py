"""Tests for plugin.neighbors: pair lists against ase.neighborlist, padding, capacity buckets."""

from __future__ import annotations

import math
import time

import ase
import ase.build
import ase.neighborlist
import numpy as np
import pytest
import vesin

from plugin.neighbors import (
  NeighborListBuilder,
  PaddedPairs,
  bucket_capacity,
  neighbor_pairs,
  neighbor_pairs_from_atoms,
  pad_pairs,
)

# ------------------------------------------------------------------------------------------------
# helpers


def _keyed(i, j, shifts, dist):
  """{(i, j, shift tuple): distance}, failing on duplicates."""
  out = {}
  shifts = np.rint(np.asarray(shifts)).astype(int).tolist()
  for a, b, s, d in zip(
    np.asarray(i).tolist(), np.asarray(j).tolist(), shifts, np.asarray(dist).tolist()
  ):
    key = (a, b, tuple(s))
    assert key not in out, f"duplicate pair {key}"
    out[key] = d
  return out


def _ours(atoms, cutoff, **kw):
  dst, src, shifts = neighbor_pairs_from_atoms(atoms, cutoff, **kw)
  pos = atoms.get_positions()
  vec = pos[src] - pos[dst] + np.asarray(shifts, dtype=np.float64) @ atoms.get_cell().array
  return dst, src, shifts, _keyed(dst, src, shifts, np.linalg.norm(vec, axis=1))


def _ase(atoms, cutoff):
  i, j, d, s = ase.neighborlist.neighbor_list("ijdS", atoms, cutoff)
  return _keyed(i, j, s, d)


def assert_matches_ase(atoms, cutoff, min_pairs=1):
  dst, src, shifts, ours = _ours(atoms, cutoff)
  ref = _ase(atoms, cutoff)
  assert len(ref) >= min_pairs, "reference has too few pairs for a meaningful test"
  missing = sorted(set(ref) - set(ours))[:5]
  extra = sorted(set(ours) - set(ref))[:5]
  assert not missing and not extra, f"missing {missing}, extra {extra}"
  keys = sorted(ref)
  np.testing.assert_allclose([ours[k] for k in keys], [ref[k] for k in keys], rtol=0, atol=1e-9)
  # invariants of the convention
  assert dst.dtype == np.int32 and src.dtype == np.int32
  assert np.all(np.diff(dst) >= 0), "not sorted by dst"
  zero_self = (dst == src) & ~np.any(np.asarray(shifts) != 0, axis=1)
  assert not zero_self.any(), "zero-distance self pair present"
  return ours


def _random_molecule(n, box, seed, offset=0.0, min_dist=0.7):
  rng = np.random.default_rng(seed)
  pos = []
  while len(pos) < n:
    p = rng.uniform(0, box, 3)
    if all(np.linalg.norm(p - q) > min_dist for q in pos):
      pos.append(p)
  return ase.Atoms(f"C{n}", positions=np.array(pos) + offset)


def _rotation(seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  return q * np.sign(np.diag(r))


def _cu(size=(1, 1, 1), cubic=False, rattle=0.0, seed=0):
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=cubic) * size
  if rattle:
    atoms.rattle(rattle, seed=seed)
  return atoms


def _systems():
  rot = _rotation(3)
  slab = ase.build.fcc111("Cu", (2, 2, 3), vacuum=5.0)
  slab.rattle(0.05, seed=1)
  rotated_slab = slab.copy()
  rotated_slab.set_cell(slab.cell.array @ rot.T, scale_atoms=True)
  rng = np.random.default_rng(7)
  wire = ase.Atoms(
    "H12",
    positions=rng.uniform(-5, 15, (12, 3)),
    cell=[[2.9, 0, 0], [0, 0, 0], [0, 0, 0]],
    pbc=[True, False, False],
  )
  tri = ase.Atoms(
    "Si3",
    scaled_positions=[[0, 0, 0], [0.3, 0.4, 0.2], [0.7, 0.1, 0.6]],
    cell=[[3.0, 0, 0], [1.4, 2.8, 0], [0.7, -0.9, 3.1]],
    pbc=True,
  )
  skewed = ase.Atoms(
    "Si2",
    scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.5, 0.9]],
    cell=[[3.0, 0, 0], [2.9, 0.5, 0], [2.8, 0.6, 1.1]],
    pbc=True,
  )
  unwrapped = _cu((2, 2, 2), rattle=0.1, seed=4)
  unwrapped.positions += np.random.default_rng(5).uniform(-40, 40, (len(unwrapped), 3))
  open_in_box = _random_molecule(15, 6.0, seed=2, offset=-20.0)
  open_in_box.set_cell([3.0, 3.0, 3.0])  # a cell that must be ignored: pbc False
  return {
    "molecule_open": (_random_molecule(25, 7.0, seed=0), 3.0),
    "molecule_negative_coords": (_random_molecule(20, 6.0, seed=1, offset=-300.0), 3.5),
    "molecule_small_cell_no_pbc": (open_in_box, 3.0),
    "cu_supercell": (_cu((3, 3, 3), rattle=0.05), 5.0),
    "cu_cubic_supercell": (_cu((2, 2, 2), cubic=True, rattle=0.05, seed=2), 5.0),
    "cu_one_atom": (_cu(), 5.0),
    "triclinic_small": (tri, 4.5),
    "triclinic_very_skewed": (skewed, 4.0),
    "slab_mixed_pbc": (slab, 5.0),
    "slab_rotated_cell": (rotated_slab, 5.0),
    "wire_zero_open_rows": (wire, 6.0),
    "unwrapped_positions": (unwrapped, 5.0),
  }


SYSTEMS = _systems()


# ------------------------------------------------------------------------------------------------
# agreement with ase.neighborlist


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_matches_ase(name):
  atoms, cutoff = SYSTEMS[name]
  assert_matches_ase(atoms, cutoff, min_pairs=2 * len(atoms))


def test_one_atom_cell_equals_supercell():
  cutoff = 5.0
  small = _cu()
  big = _cu((4, 4, 4))
  dst_s, src_s, sh_s, pairs_s = _ours(small, cutoff)
  # FCC shells at a/sqrt2 (12), a (6), a*sqrt(3/2) (24) are inside 5 A; next is at 5.09 A
  assert len(dst_s) == 42
  assert np.all(dst_s == 0) and np.all(src_s == 0), "1-atom cell: every pair is a self-image"
  assert np.all(np.any(sh_s != 0, axis=1))
  d_small = np.sort(list(pairs_s.values()))
  dst_b, _, _, pairs_b = _ours(big, cutoff)
  counts = np.bincount(dst_b, minlength=len(big))
  assert np.all(counts == 42)
  d_big = np.sort([d for (i, _, _), d in pairs_b.items() if i == 17])
  np.testing.assert_allclose(d_small, d_big, atol=1e-10)


def test_small_triclinic_cell_equals_supercell():
  cutoff = 4.5
  atoms, _ = SYSTEMS["triclinic_small"]
  big = atoms * (3, 4, 3)
  _, _, _, small_pairs = _ours(atoms, cutoff)
  dst_b, _, _, big_pairs = _ours(big, cutoff)
  for a in range(len(atoms)):
    ds = np.sort([d for (i, _, _), d in small_pairs.items() if i == a])
    assert len(ds) > 10
    for image in range(a, len(big), len(atoms)):  # the copies of atom a in the supercell
      db = np.sort([d for (i, _, _), d in big_pairs.items() if i == image])
      np.testing.assert_allclose(ds, db, atol=1e-9)


def test_full_list_is_symmetric():
  atoms, cutoff = SYSTEMS["triclinic_small"]
  dst, src, shifts, pairs = _ours(atoms, cutoff)
  for i, j, s in pairs:
    assert (j, i, tuple(-x for x in s)) in pairs


def test_sorted_even_when_vesin_is_not():
  atoms = _cu((4, 4, 4), rattle=0.1, seed=3)
  raw_i, _ = vesin.NeighborList(cutoff=5.0, full_list=True).compute(
    atoms.positions, atoms.cell.array, True, "ij"
  )
  assert np.any(np.diff(raw_i.astype(np.int64)) < 0), "vesin output already sorted: weak test"
  dst, src, _ = neighbor_pairs_from_atoms(atoms, 5.0)
  assert np.all(np.diff(dst) >= 0)
  # stable: equal to a stable argsort of vesin's order
  order = np.argsort(raw_i, kind="stable")
  np.testing.assert_array_equal(dst, raw_i[order])


@pytest.mark.parametrize("num_atoms", [1, 1000, 70_000, 3_000_000])
def test_stable_order_matches_numpy(num_atoms):
  from plugin.neighbors.host import _stable_order

  keys = np.random.default_rng(num_atoms).integers(0, num_atoms, 200_000).astype(np.int32)
  np.testing.assert_array_equal(_stable_order(keys, num_atoms), np.argsort(keys, kind="stable"))


def test_shift_dtypes_and_integrality():
  atoms = _cu()
  _, _, s64 = neighbor_pairs_from_atoms(atoms, 5.0)
  _, _, s32 = neighbor_pairs_from_atoms(atoms, 5.0, shift_dtype=np.float32)
  _, _, si = neighbor_pairs_from_atoms(atoms, 5.0, shift_dtype=np.int32)
  assert s64.dtype == np.float64 and s32.dtype == np.float32 and si.dtype == np.int32
  np.testing.assert_array_equal(s64, np.rint(s64))
  np.testing.assert_array_equal(s64, si.astype(np.float64))
  assert np.abs(si).max() >= 2  # a 1-atom cell with cutoff 5 A reaches second images


def test_accepts_lists_float32_and_ase_cell():
  atoms = _cu((2, 2, 2), rattle=0.05)
  ref = neighbor_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
  got = neighbor_pairs(atoms.positions.tolist(), atoms.cell, [1, 1, 1], 5.0)
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a, b)
  got32 = neighbor_pairs(atoms.positions.astype(np.float32), atoms.cell.array, True, 5.0)
  assert got32[0].dtype == np.int32 and len(got32[0]) > 0
  ortho = ase.Atoms("Cu2", positions=[[0, 0, 0], [1.8, 1.8, 0]], cell=[3.6, 3.6, 3.6], pbc=True)
  a = neighbor_pairs(ortho.positions, [3.6, 3.6, 3.6], True, 4.0)
  b = neighbor_pairs(ortho.positions, np.diag([3.6, 3.6, 3.6]), True, 4.0)
  np.testing.assert_array_equal(a[2], b[2])


# ------------------------------------------------------------------------------------------------
# cases where raw vesin 0.6 crashes the process or loses pairs (regressions)


def test_far_away_atom_open_boundaries():
  # raw vesin dies with SIGFPE here (cell grid of ~1e5 x 1 x 1 cells is shrunk to 0)
  atoms = _random_molecule(20, 6.0, seed=11)
  atoms.positions[0] = [3.2e5, 1.0, 1.0]
  atoms.positions[1] = [3.2e5 + 1.1, 1.0, 1.0]  # a far-away pair must survive
  ours = assert_matches_ase(atoms, 3.0, min_pairs=20)
  assert (0, 1, (0, 0, 0)) in ours
  atoms.positions[0] = [-1e9, 5.0, 1e9]
  assert_matches_ase(atoms, 3.0, min_pairs=20)


def test_wide_thin_periodic_slab():
  # raw vesin dies with SIGFPE here (340 x 340 x 1 cells)
  atoms = ase.Atoms(
    "H3",
    positions=[[0, 0, 0], [0.5, 0.7, 0.3], [1700, 0.2, 0.6]],
    cell=[[1700.0, 0, 0], [0, 1700.0, 0], [0, 0, 1.0]],
    pbc=True,
  )
  assert_matches_ase(atoms, 5.0, min_pairs=50)


def test_very_long_wire():
  atoms = ase.Atoms(
    "H3",
    positions=[[0, 0, 0], [1.0, 0.5, 0.0], [4.0e5, 0, 3.0]],
    cell=[[6.0e5, 0, 0], [0, 0, 0], [0, 0, 0]],
    pbc=[True, False, False],
  )
  assert_matches_ase(atoms, 5.0, min_pairs=2)


@pytest.mark.parametrize("rotate", [False, True])
def test_slab_with_molecule_far_above(rotate):
  # raw vesin takes hours here (its mixed-pbc search is quadratic in the open-direction grid)
  slab = ase.build.fcc111("Cu", (2, 2, 3), vacuum=5.0)
  slab.rattle(0.05, seed=1)
  slab += ase.Atoms("H2", positions=[[1.0, 1.0, 5e5], [1.5, 1.0, 5e5 + 0.7]])
  if rotate:
    slab.set_cell(slab.cell.array @ _rotation(3).T, scale_atoms=True)
  t0 = time.perf_counter()
  neighbor_pairs_from_atoms(slab, 5.0)
  assert time.perf_counter() - t0 < 2.0
  ours = assert_matches_ase(slab, 5.0, min_pairs=100)
  assert (12, 13, (0, 0, 0)) in ours


def test_wire_with_clusters_far_apart():
  # raw vesin: ~45 s for this 200-atom system (pbc along x only, clusters 1000 A apart in y, z)
  rng = np.random.default_rng(0)
  pos = rng.uniform(0, 10, (200, 3))
  pos[:100, 2] += 1000.0
  pos[:50, 1] += 1000.0
  atoms = ase.Atoms(
    "H200", positions=pos, cell=np.diag([10.0, 10.0, 10.0]), pbc=[True, False, False]
  )
  t0 = time.perf_counter()
  neighbor_pairs_from_atoms(atoms, 5.0)
  assert time.perf_counter() - t0 < 2.0
  assert_matches_ase(atoms, 5.0, min_pairs=1000)


def test_huge_coordinates_along_open_directions():
  mol = _random_molecule(25, 7.0, seed=8)
  slab, _ = SYSTEMS["slab_mixed_pbc"]
  for atoms, offset in [(mol, [3e10, -2e10, 1e10]), (slab, [0.0, 0.0, -4e10])]:
    ref = set(_ours(atoms, 4.0)[3])
    moved = atoms.copy()
    moved.positions += offset
    got = set(_ours(moved, 4.0)[3])
    assert got == ref and len(ref) > 2 * len(atoms)


def test_close_gaps_keeps_pairs_and_shrinks_extent():
  from plugin.neighbors.host import _close_gaps, _open_directions

  rng = np.random.default_rng(3)
  pos = rng.uniform(0, 8, (60, 3))
  pos[:20] += [1e6, 0, 0]
  pos[20:30] += [0, -3e7, 2e5]
  for pbc, cell in [
    ([False] * 3, np.zeros((3, 3))),
    ([False, True, True], np.array([[0, 0, 0], [1.0, 9.0, 0], [0, 2.0, 8.0]])),
  ]:
    pbc = np.array(pbc)
    dirs = _open_directions(cell, pbc)
    closed = _close_gaps(pos, dirs, 6.0)
    assert np.ptp(closed @ dirs.T, axis=0).max() < 100.0
    # moves are perpendicular to the periodic vectors
    np.testing.assert_allclose((closed - pos) @ cell[pbc].T, 0.0, atol=1e-6)
    a = neighbor_pairs(pos, cell, pbc, 3.0)
    b = neighbor_pairs(closed, cell, pbc, 3.0)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
    assert len(a[0]) > 50


def test_huge_unwrapped_coordinates():
  # raw vesin silently drops pairs for atoms ~1e10 A outside the cell (int32 cell index)
  atoms = _cu((2, 2, 2), cubic=True, rattle=0.1, seed=6)
  cell = atoms.cell.array
  dst0, src0, sh0, _ = _ours(atoms, 5.0)
  n = np.zeros((len(atoms), 3), dtype=np.int64)
  n[3] = [2_000_000_000, -1_500_000_000, 7]
  n[10] = [-3_000_000_000, 0, 900_000_000]
  moved = atoms.copy()
  moved.positions += n @ cell
  dst, src, sh = neighbor_pairs_from_atoms(moved, 5.0, shift_dtype=np.int64)
  back = (sh + n[src] - n[dst]).tolist()  # shifts relative to the original positions
  got = {(a, b, tuple(s)) for a, b, s in zip(dst.tolist(), src.tolist(), back)}
  orig = sh0.astype(int).tolist()
  ref = {(a, b, tuple(s)) for a, b, s in zip(dst0.tolist(), src0.tolist(), orig)}
  assert got == ref


# ------------------------------------------------------------------------------------------------
# empty, isolated, bad input


@pytest.mark.parametrize("pbc", [False, True])
def test_empty_system(pbc):
  dst, src, shifts = neighbor_pairs(np.zeros((0, 3)), np.eye(3) * 5.0, pbc, 3.0)
  assert dst.shape == (0,) and src.shape == (0,) and shifts.shape == (0, 3)
  assert dst.dtype == np.int32 and shifts.dtype == np.float64


def test_single_isolated_atom():
  for cell, pbc in [(None, False), (np.zeros((3, 3)), False), (np.eye(3) * 20.0, True)]:
    dst, src, shifts = neighbor_pairs([[1.0, 2.0, 3.0]], cell, pbc, 5.0)
    assert len(dst) == len(src) == len(shifts) == 0
  # ... but in a small periodic cell it sees its own images
  dst, src, shifts = neighbor_pairs([[1.0, 2.0, 3.0]], np.eye(3) * 3.0, True, 3.5)
  assert len(dst) == 6 and np.all(dst == 0) and np.all(src == 0)


def test_atoms_without_neighbours_in_a_molecule():
  pos = np.array([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0]])
  dst, src, _ = neighbor_pairs(pos, None, False, 2.0)
  assert sorted(zip(dst.tolist(), src.tolist())) == [(0, 1), (1, 0)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions_name_the_atom(bad):
  pos = np.random.default_rng(0).uniform(0, 5, (6, 3))
  pos[3, 1] = bad
  pos[5, 0] = bad
  with pytest.raises(ValueError, match=r"atom 3\b.*not finite"):
    neighbor_pairs(pos, np.eye(3) * 5, True, 3.0)


@pytest.mark.parametrize(
  "cell, pbc, match",
  [
    (np.zeros((3, 3)), True, "zero length"),
    (np.diag([4.0, 0.0, 4.0]), [True, True, True], "zero length"),
    # mixed pbc with a zero periodic vector: raw vesin crashes (SIGFPE) on this one
    (np.diag([3.0, 0.0, 0.0]), [True, True, False], "zero length"),
    ([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]], True, "singular"),
    ([[3.0, 0, 0], [0, 3.0, 0], [1.0, 1.0, 1e-12]], True, "singular"),
    ([[3.0, 0, 0], [3.0, 1e-14, 0], [0, 0, 5.0]], [True, True, False], "singular"),
    (None, True, "cell is None"),
    (np.full((3, 3), np.nan), False, "NaN"),
  ],
)
def test_bad_cells(cell, pbc, match):
  with pytest.raises(ValueError, match=match):
    neighbor_pairs([[0.0, 0, 0], [0.5, 0.5, 0.5]], cell, pbc, 2.0)


def test_degenerate_open_rows_are_fine():
  # rows of non-periodic directions are ignored, even if zero or dependent
  pos = [[0.0, 0, 0], [1.0, 0.5, 0.2]]
  cell = [[3.0, 0, 0], [3.0, 0, 0], [0, 0, 0]]
  dst, _, shifts = neighbor_pairs(pos, cell, [True, False, False], 2.5)
  assert len(dst) == 4 and np.all(shifts[:, 1:] == 0)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(positions=np.zeros((4, 2))), r"shape \(N, 3\)"),
    (dict(positions=np.zeros(3)), r"shape \(N, 3\)"),
    (dict(positions=[["a", "b", "c"]]), "positions"),
    (dict(positions=np.zeros((2, 3)) + 1j), "real"),
    (dict(cell=np.eye(2)), r"\(3, 3\)"),
    (dict(pbc=[True, False]), "pbc"),
    (dict(pbc="yes"), "pbc"),
    (dict(cutoff=0.0), "cutoff"),
    (dict(cutoff=-2.0), "cutoff"),
    (dict(cutoff=float("nan")), "cutoff"),
    (dict(cutoff="big"), "cutoff"),
  ],
)
def test_bad_arguments(kwargs, match):
  args = dict(
    positions=np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], cell=np.eye(3) * 5, pbc=True, cutoff=2.0
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    neighbor_pairs(**args)


# ------------------------------------------------------------------------------------------------
# padding and capacity buckets


def test_pad_pairs_layout():
  atoms = _cu((2, 2, 2), rattle=0.05)
  dst, src, shifts = neighbor_pairs_from_atoms(atoms, 4.0)
  p, n = len(dst), len(atoms)
  cap = p + 37
  pd, ps, psh = pad_pairs(dst, src, shifts, cap, n)
  assert pd.shape == (cap,) and ps.shape == (cap,) and psh.shape == (cap, 3)
  assert pd.dtype == np.int32 and ps.dtype == np.int32 and psh.dtype == shifts.dtype
  np.testing.assert_array_equal(pd[:p], dst)
  np.testing.assert_array_equal(ps[:p], src)
  np.testing.assert_array_equal(psh[:p], shifts)
  assert np.all(pd[p:] == n) and np.all(ps[p:] == n) and np.all(psh[p:] == 0)
  assert np.all(np.diff(pd) >= 0), "padding must keep dst sorted"
  # exact fit and empty
  assert len(pad_pairs(dst, src, shifts, p, n)[0]) == p
  e = pad_pairs(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 3)), 8, 0)
  assert np.all(e[0] == 0) and e[2].shape == (8, 3)


def test_pad_pairs_overflow_and_shape_errors():
  dst, src, sh = np.array([0, 1, 1]), np.array([1, 0, 0]), np.zeros((3, 3))
  with pytest.raises(ValueError, match="do not fit capacity 2"):
    pad_pairs(dst, src, sh, 2, 2)
  with pytest.raises(ValueError, match="shape"):
    pad_pairs(dst, src[:2], sh, 8, 2)


def test_bucket_ladder():
  caps = [bucket_capacity(n) for n in range(0, 200_000, 7)]
  ns = list(range(0, 200_000, 7))
  assert all(c >= math.ceil(n * 1.1) for n, c in zip(ns, caps))
  assert all(b >= a for a, b in zip(caps, caps[1:])), "not monotonic"
  assert caps[0] == 64 and all(c % 8 == 0 for c in caps)
  rungs = sorted(set(caps))
  ratios = np.array(rungs[1:]) / np.array(rungs[:-1])
  assert np.all(ratios > 1.0) and np.all(ratios < 1.25 * 1.13)
  np.testing.assert_allclose(ratios[-10:], 1.25, rtol=0.01)
  # few rungs: log_1.25(220000 / 64) ~ 37
  assert len(rungs) <= 40
  # the ladder does not depend on n: every value returned is a rung
  assert bucket_capacity(rungs[5]) in rungs and bucket_capacity(12345, headroom=0) in [
    bucket_capacity(k, headroom=0) for k in range(12345, 20000)
  ]
  # ceil(10 * 1.5**12) = 1298 is the first rung >= 1000
  assert bucket_capacity(1000, growth=1.5, minimum=10, headroom=0, align=1) == 1298
  for bad in [dict(growth=1.0), dict(minimum=0), dict(headroom=-0.1)]:
    with pytest.raises(ValueError):
      bucket_capacity(10, **bad)
  with pytest.raises(ValueError):
    bucket_capacity(-1)


def test_builder_few_resizes_during_fluctuations():
  base = _cu((3, 3, 3))
  cutoff = 4.4  # just below the third FCC shell (4.41 A), so thermal noise moves pairs in and out
  builder = NeighborListBuilder(cutoff=cutoff)
  rng = np.random.default_rng(0)
  seen = set()
  counts = []
  for step in range(25):
    atoms = base.copy()
    atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
    out = builder.build_from_atoms(atoms)
    assert isinstance(out, PaddedPairs)
    counts.append(out.num_pairs)
    seen.add(out.capacity)
    ref = neighbor_pairs_from_atoms(atoms, cutoff)
    np.testing.assert_array_equal(out.dst[: out.num_pairs], ref[0])
    np.testing.assert_array_equal(out.src[: out.num_pairs], ref[1])
    np.testing.assert_array_equal(out.shifts[: out.num_pairs], ref[2])
    assert np.all(out.dst[out.num_pairs :] == len(atoms))
  assert len(set(counts)) > 5, "pair count did not fluctuate: weak test"
  assert builder.capacity_changes == 1 == len(seen)


def test_builder_grows_geometrically_and_never_shrinks():
  builder = NeighborListBuilder(cutoff=5.0, growth=1.5, headroom=0.0, minimum_capacity=16)
  sizes = [(1, 1, 1), (2, 2, 2), (1, 1, 1), (3, 3, 3), (2, 2, 2)]
  caps, resized = [], []
  for size in sizes:
    out = builder.build_from_atoms(_cu(size))
    assert out.capacity >= out.num_pairs and len(out.dst) == out.capacity
    caps.append(out.capacity)
    resized.append(out.resized)
  assert caps[2] == caps[1] and caps[4] == caps[3] > caps[1] > caps[0]
  assert resized == [True, True, False, True, False]
  assert builder.capacity_changes == 3
  assert builder.num_pairs == 42 * 8
  # shrink only when asked
  builder.reset_capacity()
  small = builder.build_from_atoms(_cu())
  assert small.capacity == bucket_capacity(42, 16, 1.5, 0.0) < caps[-1]
  assert small.resized and builder.capacity_changes == 4
  builder.reset_capacity(10_000)
  assert builder.capacity == bucket_capacity(10_000, 16, 1.5, 0.0)
  assert builder.capacity_changes == 5


def test_builder_keeps_the_pairs_of_the_first_centres():
  """``centres=k`` (a domain decomposition's own atoms): exactly the full list's pairs centred
  on atoms 0..k-1, in order, padded to a capacity fitted to them."""
  atoms = _cu((2, 2, 2))
  full = NeighborListBuilder(cutoff=4.0).build_from_atoms(atoms)
  k = len(atoms) // 3
  out = NeighborListBuilder(cutoff=4.0).build(
    atoms.positions, atoms.cell.array, atoms.pbc, centres=k
  )
  own = full.dst[: full.num_pairs] < k
  assert 0 < out.num_pairs == np.count_nonzero(own) < full.num_pairs
  np.testing.assert_array_equal(out.dst[: out.num_pairs], full.dst[: full.num_pairs][own])
  np.testing.assert_array_equal(out.src[: out.num_pairs], full.src[: full.num_pairs][own])
  np.testing.assert_array_equal(out.shifts[: out.num_pairs], full.shifts[: full.num_pairs][own])
  assert out.capacity < full.capacity and np.all(out.dst[out.num_pairs :] == len(atoms))


def test_builder_rejects_bad_input_without_changing_state():
  builder = NeighborListBuilder(cutoff=3.0)
  builder.build([[0.0, 0, 0], [1.0, 0, 0]], None, False)
  cap = builder.capacity
  with pytest.raises(ValueError, match="atom 1"):
    builder.build([[0.0, 0, 0], [np.nan, 0, 0]], None, False)
  assert builder.capacity == cap and builder.capacity_changes == 1
  with pytest.raises(ValueError, match="cutoff"):
    NeighborListBuilder(cutoff=0.0)
