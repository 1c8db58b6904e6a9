"""Tests for plugin.jax_md: energies, forces and stress against a brute-force ASE pair list,
the sorted idx row, per-atom energies, the four JAX-MD integrators, and refusals.

Everything runs in float64 (conftest enables x64) unless a test casts to float32 on purpose.
Each jitted function is compiled once per module; the model is tiny.
"""

from __future__ import annotations

import functools

import ase
import ase.build
import ase.neighborlist
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_copper_potential
from jax_md import partition, quantity, simulate, space, units

import potentials
import plugin.jax_md as pjm

pytestmark = pytest.mark.filterwarnings(
  # JAX-MD's own partition code scatters int64 into int32 arrays under x64.
  "ignore:scatter inputs have incompatible types:FutureWarning"
)

RC = 3.0
SKIN = 0.2
MAX_PAIRS = 1024  # padded capacity of the reference pair list (one compile for every case)
UNITS = units.metal_unit_system()
FS = float(UNITS["time"]) * 1e-3  # 1 fs in JAX-MD metal time units
KT = 300.0 * float(UNITS["temperature"])  # eV
MASS = 63.546  # amu

# Lattice vectors as ASE cell rows (lower triangular), so JAX-MD's box = cell.T is upper
# triangular, as space.periodic_general and the fractional neighbour list expect.
CELLS = {
  "general_ortho": np.diag([7.3, 7.2, 7.5]),
  "general_triclinic": np.array([[7.2, 0.0, 0.0], [1.1, 7.1, 0.0], [0.7, -0.9, 7.3]]),
  "periodic": np.diag([7.4, 7.2, 7.3]),
}


@pytest.fixture(scope="module")
def pot():
  return tiny_copper_potential(RC)


def fcc32(cell: np.ndarray, seed: int = 0, rattle: float = 0.08) -> ase.Atoms:
  """32 Cu atoms on the fcc sites of a 2x2x2 cubic cell, mapped into ``cell``, rattled."""
  frac = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2).get_scaled_positions()
  atoms = ase.Atoms("Cu32", scaled_positions=frac, cell=cell, pbc=True)
  atoms.rattle(rattle, seed=seed)
  atoms.wrap()
  return atoms


# --------------------------------------------------------------------------------------------
# brute-force reference: ASE pair list (with periodic images) + pot.atomic_energies_fn()


@functools.lru_cache(maxsize=None)
def _reference_fns(pot):
  f = pot.atomic_energies_fn()

  def energies(params, species, pos, dst, src, shifts, cell):
    return f(params, species, pos, dst, src, shifts, cell)

  def total(*args):
    return jnp.sum(energies(*args))

  return jax.jit(energies), jax.jit(jax.value_and_grad(total, argnums=2))


def reference(pot, atoms: ase.Atoms):
  """(energy, forces, per-atom energies) from a padded ASE pair list, float64."""
  i, j, s = ase.neighborlist.neighbor_list("ijS", atoms, RC)
  n, p = len(atoms), len(i)
  assert p <= MAX_PAIRS
  pad = MAX_PAIRS - p
  dst = np.concatenate([i, np.full(pad, n)]).astype(np.int32)
  src = np.concatenate([j, np.full(pad, n)]).astype(np.int32)
  shifts = np.concatenate([s, np.zeros((pad, 3))]).astype(np.float64)
  cell = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
  args = (
    pot.params,
    jnp.asarray(pot.species_index(atoms.numbers)),
    jnp.asarray(atoms.positions),
    jnp.asarray(dst),
    jnp.asarray(src),
    jnp.asarray(shifts),
    jnp.asarray(cell),
  )
  energies_fn, value_and_grad_fn = _reference_fns(pot)
  e, g = value_and_grad_fn(*args)
  return float(e), -np.asarray(g), np.asarray(energies_fn(*args))


# --------------------------------------------------------------------------------------------
# the systems, in each JAX-MD space


def make_case(pot, name: str, **kw):
  """(atoms, R, neighbor_fn, energy_fn, box, shift_fn) for one space."""
  if name == "free":
    atoms = fcc32(CELLS["general_ortho"], seed=4)
    atoms.pbc = False
    atoms.positions += 2.0  # inside the cell-list region [0, box)
    box = np.full(3, 12.0)
    displacement_fn, shift_fn = space.free()
    R = atoms.positions
    nfn, efn = pjm.neighbor_list(
      pot, displacement_fn, box, atomic_numbers=atoms.numbers, dr_threshold=SKIN, **kw
    )
  elif name == "periodic":
    atoms = fcc32(CELLS[name], seed=3)
    box = np.diag(atoms.cell.array)
    displacement_fn, shift_fn = space.periodic(box)
    R = atoms.positions
    nfn, efn = pjm.neighbor_list(
      pot, displacement_fn, box, atomic_numbers=atoms.numbers, dr_threshold=SKIN, **kw
    )
  else:
    atoms = fcc32(CELLS[name], seed=1 if "ortho" in name else 2)
    box = atoms.cell.array.T
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
    R = atoms.get_scaled_positions()
    nfn, efn = pjm.neighbor_list(
      pot,
      displacement_fn,
      box,
      atomic_numbers=atoms.numbers,
      dr_threshold=SKIN,
      fractional_coordinates=True,
      **kw,
    )
  return atoms, jnp.asarray(R), nfn, efn, box, shift_fn


def assert_dst_sorted(nbrs, n):
  """idx[1] (our dst) is non-decreasing over the valid pairs, and padding follows them."""
  src, dst = np.asarray(nbrs.idx[0]), np.asarray(nbrs.idx[1])
  valid = (src < n) & (dst < n)
  assert np.all(np.diff(dst[valid]) >= 0)
  k = int(valid.sum())
  assert np.all(valid[:k]) and not np.any(valid[k:])
  # both directions of every pair are present
  pairs = set(zip(src[valid].tolist(), dst[valid].tolist()))
  assert pairs == {(b, a) for a, b in pairs}


@pytest.mark.parametrize("name", ["general_ortho", "general_triclinic", "periodic", "free"])
def test_energy_forces_match_brute_force(pot, name):
  atoms, R, nfn, efn, _, _ = make_case(pot, name)
  nbrs = nfn.allocate(R)
  assert nbrs.idx.shape[0] == 2 and not nbrs.did_buffer_overflow
  assert_dst_sorted(nbrs, len(atoms))
  e, g = jax.jit(jax.value_and_grad(efn))(R, nbrs)
  # With fractional coordinates JAX-MD's displacement makes grad(E) a real-space gradient.
  f = -np.asarray(g)
  e_ref, f_ref, _ = reference(pot, atoms)
  rel_e = abs(float(e) - e_ref) / abs(e_ref)
  rel_f = np.abs(f - f_ref).max() / np.abs(f_ref).max()
  print(f"{name}: relative energy error {rel_e:.2e}, relative force error {rel_f:.2e}")
  print(f"{name}: max |F| {np.abs(f_ref).max():.3f} eV/Å")
  assert np.abs(f_ref).max() > 1e-3  # a test with zero forces would prove nothing
  assert rel_e <= 1e-8 and rel_f <= 1e-8


# --------------------------------------------------------------------------------------------
# stress, per-atom energies


@pytest.fixture(scope="module")
def triclinic(pot):
  return make_case(pot, "general_triclinic")


def test_stress_matches_strained_box(pot, triclinic):
  atoms, R, nfn, efn, box, _ = triclinic
  box = jnp.asarray(box)
  nbrs = nfn.allocate(R)
  stress = np.asarray(jax.jit(lambda R, nbrs: quantity.stress(efn, R, box, neighbor=nbrs))(R, nbrs))
  energy_at = jax.jit(lambda b: efn(R, nbrs, box=b))
  # Straining the box (I + eps) @ box at fixed fractional positions maps every pair vector
  # r -> (I + eps) r, the same as JAX-MD's `perturbation`; central differences of E.
  h = 1e-5
  de = np.zeros((3, 3))
  for a in range(3):
    for b in range(3):
      eps = np.zeros((3, 3))
      eps[a, b] = h
      de[a, b] = (energy_at((np.eye(3) + eps) @ box) - energy_at((np.eye(3) - eps) @ box)) / (2 * h)
  volume = abs(np.linalg.det(np.asarray(box)))
  # JAX-MD: stress = -(1/V) dE/d(eps) (its "internal stress": positive under compression, a
  # crystal pushing outwards). ASE's atoms.get_stress() is +(1/V) dE/d(eps),
  # so ASE stress = -(JAX-MD stress) (3x3 here; ASE's Voigt order is xx yy zz yz xz xy).
  expected = -de / volume
  err = np.abs(stress - expected).max() / np.abs(expected).max()
  print(f"stress: relative difference to finite differences {err:.2e}")
  assert np.abs(expected).max() > 1e-5
  assert err <= 1e-6
  np.testing.assert_allclose(stress, stress.T, atol=1e-10 * np.abs(stress).max())

  # The same jitted function: a box narrower than 2 * cutoff (NPT gone wrong) gives NaN,
  # never a silently wrong minimum-image energy.
  assert np.isnan(energy_at(0.8 * box))
  assert np.isfinite(energy_at(1.001 * box))
  # ... and a box narrower than 2 * (cutoff + skin) sets the list's cell_size_too_small bit.
  too_small = jax.jit(lambda R, nbrs, b: nbrs.update(R, box=b))(R, nbrs, 0.9 * box)
  assert too_small.cell_size_too_small
  assert not jax.jit(lambda R, nbrs, b: nbrs.update(R, box=b))(R, nbrs, box).cell_size_too_small


def test_per_atom_energies(pot, triclinic):
  atoms, R, nfn, efn, box, _ = triclinic
  displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
  _, per_atom_fn = pjm.neighbor_list(
    pot,
    displacement_fn,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=SKIN,
    fractional_coordinates=True,
    per_particle=True,
  )
  nbrs = nfn.allocate(R)
  e_i = np.asarray(jax.jit(per_atom_fn)(R, nbrs))
  e_ref, _, e_i_ref = reference(pot, atoms)  # energy_fn's total equals e_ref (tested above)
  assert e_i.shape == (len(atoms),)
  assert abs(e_i.sum() - e_ref) <= 1e-10 * abs(e_ref)
  np.testing.assert_allclose(e_i, e_i_ref, rtol=0, atol=1e-10 * np.abs(e_i_ref).max())
  with pytest.raises(TypeError, match="per_particle=True"):
    efn(R, nbrs, per_atom=True)


def test_cell_list_idx_row_one_sorted():
  # 108 atoms, box 10.8 Å > 3 cells of (cutoff + skin): JAX-MD takes its cell-list path
  # (the 32-atom tests take the all-pairs path). idx[1] stays sorted after updates too.
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3)
  atoms.rattle(0.1, seed=5)
  atoms.wrap()
  side = np.diag(atoms.cell.array)
  displacement_fn, shift_fn = space.periodic(side)
  # capacity_multiplier=2: a near-perfect lattice fills every cell equally, so the default
  # cell capacity overflows as soon as atoms move (JAX-MD would then ask for a reallocation).
  fns = partition.neighbor_list(
    displacement_fn, side, RC, dr_threshold=SKIN, capacity_multiplier=2.0, format=partition.Sparse
  )
  R = jnp.asarray(atoms.positions)
  nbrs = fns.allocate(R)
  assert nbrs.cell_list_fn is not None
  assert_dst_sorted(nbrs, len(atoms))
  R2 = shift_fn(R, 0.1 * jax.random.normal(jax.random.PRNGKey(0), R.shape))
  nbrs2 = jax.jit(lambda R, nbrs: nbrs.update(R))(R2, nbrs)
  assert not nbrs2.did_buffer_overflow
  assert not np.array_equal(np.asarray(nbrs2.idx), np.asarray(nbrs.idx))
  assert_dst_sorted(nbrs2, len(atoms))


# --------------------------------------------------------------------------------------------
# integrators


def run(apply_fn, state, nbrs, steps: int, energy_fn=None, npt: bool = False):
  """``steps`` jitted steps with a neighbour-list update before each; returns
  (state, nbrs, per-step total energy or None)."""

  def step(carry, _):
    state, nbrs = carry
    if npt:
      nbrs = nbrs.update(state.position, box=simulate.npt_box(state))
    else:
      nbrs = nbrs.update(state.position)
    state = apply_fn(state, neighbor=nbrs)
    e = None
    if energy_fn is not None:
      e = energy_fn(state.position, nbrs) + quantity.kinetic_energy(
        momentum=state.momentum, mass=state.mass
      )
    return (state, nbrs), e

  (state, nbrs), e = jax.jit(lambda s, n: jax.lax.scan(step, (s, n), None, length=steps))(
    state, nbrs
  )
  return state, nbrs, e


def check_run(state, nbrs, n, R0):
  assert not nbrs.did_buffer_overflow
  assert not nbrs.cell_size_too_small
  assert np.all(np.isfinite(np.asarray(state.position)))
  assert np.all(np.isfinite(np.asarray(state.force)))
  # the list was rebuilt at least once (atoms moved more than skin / 2)
  assert not np.array_equal(np.asarray(nbrs.reference_position), np.asarray(R0))
  assert_dst_sorted(nbrs, n)


def test_nve_float32_conserves_energy(pot):
  atoms = fcc32(CELLS["general_ortho"], seed=1)
  box = jnp.asarray(atoms.cell.array.T, jnp.float32)
  displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
  nfn, efn = pjm.neighbor_list(
    pot,
    displacement_fn,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=SKIN,
    fractional_coordinates=True,
  )
  R = jnp.asarray(atoms.get_scaled_positions(), jnp.float32)
  nbrs = nfn.allocate(R)
  init_fn, apply_fn = simulate.nve(efn, shift_fn, jnp.float32(0.5 * FS))
  state = jax.jit(init_fn)(
    jax.random.PRNGKey(0), R, jnp.float32(KT), mass=jnp.float32(MASS), neighbor=nbrs
  )
  # float32 in, float32 out, and the initial forces close to the float64 reference
  _, f_ref, _ = reference(pot, atoms)
  assert state.force.dtype == jnp.float32
  assert np.abs(np.asarray(state.force) - f_ref).max() <= 1e-4 * np.abs(f_ref).max()
  state, nbrs, e = run(apply_fn, state, nbrs, 120, energy_fn=efn)
  check_run(state, nbrs, len(atoms), R)
  assert state.position.dtype == jnp.float32
  e = np.asarray(e, np.float64)
  kinetic = 1.5 * len(atoms) * KT
  drift = np.abs(e - e[0]).max()
  print(f"NVE float32: max |E(t) - E(0)| = {drift:.2e} eV over 60 fs (kinetic ~{kinetic:.2f} eV)")
  assert np.all(np.isfinite(e))
  assert drift <= 1e-3 * kinetic


@pytest.fixture(scope="module")
def ortho(pot):
  # Shared by the next three tests: each allocates a fresh list for the same energy_fn,
  # which is what broke before plugin.jax_md stored JAX-MD's cell size as a Python float.
  return make_case(pot, "general_ortho")


def test_nvt_nose_hoover(ortho):
  atoms, R, nfn, efn, _, shift_fn = ortho
  nbrs = nfn.allocate(R)
  init_fn, apply_fn = simulate.nvt_nose_hoover(efn, shift_fn, 1.0 * FS, KT)
  state = jax.jit(init_fn)(jax.random.PRNGKey(1), R, mass=MASS, neighbor=nbrs)
  state, nbrs, _ = run(apply_fn, state, nbrs, 60)
  check_run(state, nbrs, len(atoms), R)


def test_nvt_langevin(ortho):
  atoms, R, nfn, efn, _, shift_fn = ortho
  nbrs = nfn.allocate(R)
  init_fn, apply_fn = simulate.nvt_langevin(efn, shift_fn, 1.0 * FS, KT, gamma=0.1)
  state = jax.jit(init_fn)(jax.random.PRNGKey(2), R, mass=MASS, neighbor=nbrs)
  state, nbrs, _ = run(apply_fn, state, nbrs, 60)
  check_run(state, nbrs, len(atoms), R)


def test_npt_nose_hoover(ortho):
  atoms, R, nfn, efn, box, shift_fn = ortho
  box = jnp.asarray(box)
  nbrs = nfn.allocate(R)
  init_fn, apply_fn = simulate.npt_nose_hoover(efn, shift_fn, 1.0 * FS, pressure=0.0, kT=KT)
  state = jax.jit(init_fn)(jax.random.PRNGKey(3), R, box, mass=MASS, neighbor=nbrs)
  state, nbrs, _ = run(apply_fn, state, nbrs, 60, npt=True)
  check_run(state, nbrs, len(atoms), R)
  new_box = np.asarray(simulate.npt_box(state))
  assert np.all(np.isfinite(new_box)) and not np.allclose(new_box, box, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# small cells: lists with periodic images, against the ASE calculator (exact for any cell)


def small_cell(name: str) -> ase.Atoms:
  """Cells narrower than 2 * (RC + SKIN) = 6.4 Å, rattled."""
  if name == "fcc_primitive":  # 1 atom, widths 2.08 Å: 12 neighbours, all images of itself
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)
  elif name == "fcc_cubic":  # 4 atoms, 3.6 Å
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  elif name == "triclinic":  # 2 atoms in a skewed cell, widths 2.4-3.9 Å
    atoms = ase.Atoms(
      "Cu2",
      scaled_positions=[[0.0, 0.0, 0.0], [0.5, 0.45, 0.55]],
      cell=[[2.7, 0.0, 0.0], [1.1, 2.6, 0.0], [0.6, -0.8, 3.9]],
      pbc=True,
    )
  else:  # "thin": a periodic layer 2.5 Å thick and 7.2 Å wide, two square sublattices
    square = np.array([[0, 0], [0.5, 0], [0, 0.5], [0.5, 0.5]])
    frac = np.concatenate([np.c_[square, np.zeros(4)], np.c_[square + 0.25, np.full(4, 0.5)]])
    atoms = ase.Atoms("Cu8", scaled_positions=frac, cell=np.diag([7.2, 7.3, 2.5]), pbc=True)
  atoms.rattle(0.05, seed=3)
  atoms.wrap()
  return atoms


SMALL_CASES = [
  ("fcc_primitive", "general_frac"),
  ("fcc_cubic", "periodic"),
  ("triclinic", "general_frac"),
  ("triclinic", "general_real"),
  ("thin", "periodic"),
  ("thin", "general_frac"),
]


@functools.lru_cache(maxsize=None)
def small_case(pot, name: str, kind: str):
  """(atoms, R, neighbor_fn, energy_fn, box, shift_fn, fns) with
  ``fns(R, nbrs) = (energy, forces, JAX-MD stress)`` jitted (shared by the tests below)."""
  atoms = small_cell(name)
  frac = kind == "general_frac"
  if kind == "periodic":
    box = atoms.cell.lengths()
    displacement_fn, shift_fn = space.periodic(box)
  else:
    box = atoms.cell.array.T
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=frac)
  nfn, efn = pjm.neighbor_list(
    pot,
    displacement_fn,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=SKIN,
    fractional_coordinates=frac,
  )
  R = jnp.asarray(atoms.get_scaled_positions() if frac else atoms.positions)

  def fns(R, nbrs):
    e, g = jax.value_and_grad(efn)(R, nbrs)
    return e, -g, quantity.stress(efn, R, jnp.asarray(box), neighbor=nbrs)

  return atoms, R, nfn, efn, box, shift_fn, jax.jit(fns)


def ase_reference(pot, atoms):
  a = atoms.copy()
  a.calc = ase_calculator(pot)
  return a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)


@functools.lru_cache(maxsize=None)
def ase_calculator(pot):
  from plugin.ase import Calculator

  return Calculator(pot, dtype="float64")


def relative(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,kind", SMALL_CASES)
def test_small_cell_matches_ase(pot, name, kind):
  atoms, R, nfn, _, _, _, fns = small_case(pot, name, kind)
  nbrs = nfn.allocate(R)
  assert isinstance(nbrs, pjm.ImageNeighborList) and not nbrs.did_buffer_overflow
  assert_dst_sorted(nbrs, len(atoms))
  e, f, stress = fns(R, nbrs)
  e_ref, f_ref, s_ref = ase_reference(pot, atoms)
  errors = (
    abs(float(e) - e_ref) / abs(e_ref),
    relative(f, f_ref) if len(atoms) > 1 else 0.0,
    relative(-np.asarray(stress), s_ref),
  )  # JAX-MD's stress sign is minus ASE's
  print(
    f"{name} ({kind}): {int(np.sum(np.asarray(nbrs.idx[1]) < len(atoms)))} pairs, images "
    f"{nbrs.images}; relative errors E {errors[0]:.1e}, F {errors[1]:.1e}, "
    f"stress {errors[2]:.1e}"
  )
  assert np.abs(s_ref).max() > 1e-4 and (len(atoms) == 1 or np.abs(f_ref).max() > 1e-2)
  assert max(errors) <= 1e-10


@pytest.mark.parametrize("name", ["fcc_primitive", "fcc_cubic", "triclinic", "thin"])
def test_small_cell_energy_per_atom_equals_supercell(pot, name):
  atoms, R, nfn, _, _, _, fns = small_case(
    pot, name, SMALL_CASES[[c[0] for c in SMALL_CASES].index(name)][1]
  )
  e = float(fns(R, nfn.allocate(R))[0])
  reps = tuple(int(np.ceil(2 * (RC + SKIN) / w)) for w in pjm.box_widths(atoms.cell.array.T))
  big = atoms.repeat(reps)
  box = big.cell.array.T
  displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
  nfn_big, efn_big = pjm.neighbor_list(
    pot,
    displacement_fn,
    box,
    atomic_numbers=big.numbers,
    dr_threshold=SKIN,
    fractional_coordinates=True,
  )
  R_big = jnp.asarray(big.get_scaled_positions())
  nbrs_big = nfn_big.allocate(R_big)
  assert not isinstance(nbrs_big, pjm.ImageNeighborList)  # JAX-MD's own list
  e_big = float(jax.jit(efn_big)(R_big, nbrs_big))
  print(
    f"{name}: {len(atoms)} atoms {e / len(atoms):.12f} eV/atom, supercell {reps} "
    f"{e_big / len(big):.12f} eV/atom"
  )
  assert abs(e / len(atoms) - e_big / len(big)) <= 1e-10 * abs(e / len(atoms))


def test_small_cell_forces_are_minus_gradient(pot):
  atoms, R, nfn, _, box, _, fns = small_case(pot, "triclinic", "general_frac")
  nbrs = nfn.allocate(R)
  f = np.asarray(fns(R, nbrs)[1])
  h = 1e-5
  inv = np.linalg.inv(box)
  fd = np.zeros_like(f)
  for i in range(len(atoms)):
    for a in range(3):
      du = np.zeros_like(f)
      du[i] = h * inv[:, a]  # a real-space step of h along axis a, in fractional coordinates
      fd[i, a] = -(float(fns(R + du, nbrs)[0]) - float(fns(R - du, nbrs)[0])) / (2 * h)
  print(f"forces vs -dE/dx: relative difference {relative(f, fd):.1e}")
  assert np.abs(f).max() > 1e-2 and relative(f, fd) <= 1e-7


def test_small_cell_atoms_wrapping_between_rebuilds(pot):
  # Atoms cross the box faces (shift_fn wraps them) by less than skin / 2: the list is not
  # rebuilt, and its shifts still give the right images. A larger move rebuilds.
  atoms, R, nfn, _, _, shift_fn, fns = small_case(pot, "fcc_cubic", "periodic")
  nbrs = nfn.allocate(R)
  update = jax.jit(lambda R, nbrs: nbrs.update(R))
  for step, rebuilt in (
    (np.array([-0.07, 0.05, -0.04]), False),
    (np.array([-0.3, 0.2, 0.1]), True),
  ):
    R2 = shift_fn(R, jnp.broadcast_to(jnp.asarray(step), R.shape))
    crossed = np.abs(np.asarray(R2) - np.asarray(R) - step).max() > 1.0
    new = update(R2, nbrs)
    assert crossed and not new.did_buffer_overflow
    assert rebuilt == (not np.array_equal(new.reference_position, nbrs.reference_position))
    moved = atoms.copy()
    moved.positions = np.asarray(R2)
    e_ref, f_ref, _ = ase_reference(pot, moved)
    e, f, _ = fns(R2, new)
    assert abs(float(e) - e_ref) <= 1e-10 * abs(e_ref) and relative(f, f_ref) <= 1e-10


def test_small_cell_compressed_box_overflows_instead_of_missing_pairs(pot):
  # A 1-atom FCC cell (widths 2.25 Å) compressed by 10 % at fixed fractional positions, as NPT
  # does: below 2.13 Å it needs image shifts of 2 lattice vectors and more pairs than the list
  # may have room for. The jitted sweep reports overflow; one allocation for the most
  # compressed box then covers the whole sweep: one compilation per list shape (capacity and
  # image range), never one per step.
  atoms = ase.build.bulk("Cu", "fcc", a=3.9)
  box = atoms.cell.array.T
  displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
  nfn, efn = pjm.neighbor_list(
    pot,
    displacement_fn,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=SKIN,
    fractional_coordinates=True,
  )
  R = jnp.asarray(atoms.get_scaled_positions())
  scales = np.linspace(1.0, 0.9, 11)
  traces = [0]

  @jax.jit
  def sweep(R, nbrs):
    traces[0] += 1  # runs at trace time only

    def body(nbrs, s):
      nbrs = nbrs.update(R, box=s * box)
      return nbrs, efn(R, nbrs, box=s * box)

    return jax.lax.scan(body, nbrs, jnp.asarray(scales))

  nbrs = nfn.allocate(R)
  assert nbrs.images == (1, 1, 1)
  shapes = []
  for _ in range(3):
    shapes.append((nbrs.max_occupancy, nbrs.images))
    final, energies = sweep(R, nbrs)
    if not final.did_buffer_overflow:
      break
    nbrs = nfn.allocate(R, box=jnp.asarray(scales[-1] * box))
  assert len(shapes) == 2 and nbrs.images == (2, 2, 2)
  assert traces[0] == len(set(shapes)) == 2
  for s, e in zip(scales, np.asarray(energies)):
    squeezed = atoms.copy()
    squeezed.set_cell(s * atoms.cell.array, scale_atoms=True)
    e_ref = ase_reference(pot, squeezed)[0]
    assert abs(e - e_ref) <= 1e-10 * abs(e_ref), s


@pytest.mark.parametrize("integrator", ["nvt_nose_hoover", "nvt_langevin", "npt_nose_hoover"])
def test_small_cell_integrators(pot, integrator):
  atoms, R, nfn, efn, box, shift_fn, _ = small_case(pot, "fcc_cubic", "general_frac")
  nbrs = nfn.allocate(R)
  box = jnp.asarray(box)
  if integrator == "npt_nose_hoover":
    init_fn, apply_fn = simulate.npt_nose_hoover(efn, shift_fn, 1.0 * FS, pressure=0.0, kT=KT)
    state = jax.jit(init_fn)(jax.random.PRNGKey(3), R, box, mass=MASS, neighbor=nbrs)
  else:
    make = getattr(simulate, integrator)
    init_fn, apply_fn = make(
      efn, shift_fn, 1.0 * FS, KT, **({"gamma": 0.1} if integrator == "nvt_langevin" else {})
    )
    state = jax.jit(init_fn)(jax.random.PRNGKey(1), R, mass=MASS, neighbor=nbrs)
  state, nbrs, _ = run(apply_fn, state, nbrs, 60, npt=integrator == "npt_nose_hoover")
  check_run(state, nbrs, len(atoms), R)
  final = atoms.copy()
  b = np.asarray(simulate.npt_box(state)) if integrator == "npt_nose_hoover" else box
  final.set_cell(np.asarray(b).T)
  final.set_scaled_positions(np.asarray(state.position))
  kw = {"box": b} if integrator == "npt_nose_hoover" else {}
  e_ref = ase_reference(pot, final)[0]
  assert abs(float(efn(state.position, nbrs, **kw)) - e_ref) <= 1e-10 * abs(e_ref)


def test_small_cell_nve_conserves_energy(pot):
  from plugin import testing

  atoms = small_cell("fcc_cubic")
  report = testing.assert_energy_conserved(
    atoms,
    **testing.engine_kwargs("jax-md", pot, atoms, "float64", dr_threshold=SKIN),
    temperature=600,
    timestep=1.0,
    duration=0.3,
    warmup=0.03,
    sample_interval=5,
    max_drift=0.5,
    order_range=(3.5, 4.5),
  )
  print(report.summary())
  assert report.engine == "jax-md"


# --------------------------------------------------------------------------------------------
# refusals and bad input


def test_list_choice_follows_the_box(pot):
  z = np.full(4, 29)
  R = jnp.asarray(ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).get_scaled_positions())
  # orthorhombic: 6.0 Å < 2 * (3.0 + 0.2): periodic images
  box = np.diag([8.0, 6.0, 8.0])
  displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
  nfn, _ = pjm.neighbor_list(
    pot, displacement_fn, box, atomic_numbers=z, dr_threshold=SKIN, fractional_coordinates=True
  )
  nbrs = nfn.allocate(R)
  assert isinstance(nbrs, pjm.ImageNeighborList) and nbrs.images == (0, 1, 0)
  # ... and JAX-MD's own list when allocated for a box that is wide enough (NPT: box=)
  assert not isinstance(nfn.allocate(R, box=jnp.asarray(1.1 * box)), pjm.ImageNeighborList)
  # triclinic: every lattice vector is longer than 6.4 Å, but the cell is so sheared that the
  # perpendicular width is not.
  box = np.array([[7.0, 6.0, 0.0], [0.0, 3.5, 0.0], [0.0, 0.0, 8.0]])
  assert np.linalg.norm(box, axis=0).min() > 6.4 and pjm.box_widths(box).min() < 6.4
  displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
  nfn, _ = pjm.neighbor_list(
    pot, displacement_fn, box, atomic_numbers=z, dr_threshold=SKIN, fractional_coordinates=True
  )
  assert isinstance(nfn.allocate(R), pjm.ImageNeighborList)
  # space.periodic, real coordinates; the skin counts
  displacement_fn, _ = space.periodic(6.3)
  for skin, images in ((0.1, False), (0.2, True)):
    nfn, _ = pjm.neighbor_list(pot, displacement_fn, 6.3, atomic_numbers=z, dr_threshold=skin)
    assert isinstance(nfn.allocate(6.3 * R), pjm.ImageNeighborList) == images
  # the image list computes pair vectors itself: a space built for another box is refused
  displacement_fn, _ = space.periodic(6.0)
  with pytest.raises(ValueError, match="does not match the box"):
    pjm.neighbor_list(pot, displacement_fn, 6.3, atomic_numbers=z, dr_threshold=SKIN)
  # open boundaries: a small cell-list region is fine
  displacement_fn, _ = space.free()
  pjm.neighbor_list(pot, displacement_fn, 4.0, atomic_numbers=z)


def test_bad_input(pot):
  box = np.diag([7.3, 7.2, 7.5])
  displacement_fn, _ = space.periodic_general(box, fractional_coordinates=True)
  kw = dict(dr_threshold=SKIN, fractional_coordinates=True)
  with pytest.raises(potentials.UnknownElementError, match="Fe"):
    pjm.neighbor_list(pot, displacement_fn, box, atomic_numbers=[29, 26, 29], **kw)
  with pytest.raises(ValueError, match="atomic_numbers must be a non-empty 1-D integer"):
    pjm.neighbor_list(pot, displacement_fn, box, atomic_numbers=np.full((2, 2), 29), **kw)
  with pytest.raises(ValueError, match="fractional_coordinates=False"):
    pjm.neighbor_list(pot, displacement_fn, box, atomic_numbers=[29], dr_threshold=SKIN)
  with pytest.raises(ValueError, match="Sparse"):
    pjm.neighbor_list(
      pot, displacement_fn, box, atomic_numbers=[29], format=partition.OrderedSparse, **kw
    )
  with pytest.warns(DeprecationWarning, match="species= is deprecated .*use atomic_numbers="):
    pjm.neighbor_list(pot, displacement_fn, box, species=[29] * 3, **kw)  # its old name
  nfn, efn = pjm.neighbor_list(pot, displacement_fn, box, atomic_numbers=[29] * 3, **kw)
  R = np.array([[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [0.3, 0.7, 0.2]])
  with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
    nfn.allocate(jnp.asarray(R[:2]))
  bad = R.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="atom 1 are not finite"):
    nfn.allocate(jnp.asarray(bad))
  with pytest.raises(ValueError, match="inside the box"):
    nfn.allocate(jnp.asarray(R - 0.2))
  nbrs = nfn.allocate(jnp.asarray(R))
  with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
    efn(jnp.asarray(R[:2]), nbrs)
  with pytest.raises(TypeError, match="species"):
    efn(jnp.asarray(R), nbrs, species=jnp.zeros(3, jnp.int32))
