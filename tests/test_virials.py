"""Per-atom virials: ASE's ``stresses`` from plugin.ase.Calculator and
plugin.jax_md.atom_virial_fn, both the pair-gradient split of potentials.observables.

Sums against the total stress (orthorhombic, triclinic, a cell smaller than twice the cutoff),
rigid translation, a small cell against its supercell, symmetry-equivalent atoms, and JAX-MD
against ASE. float64 (conftest); one tiny Cu model; the 32-atom cells share one compiled shape.
"""

from __future__ import annotations

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_copper_potential
from jax_md import quantity, simulate, space

import plugin.jax_md as pjm
from plugin.ase import Calculator

pytestmark = pytest.mark.filterwarnings(
  # JAX-MD's own partition code scatters int64 into int32 arrays under x64.
  "ignore:scatter inputs have incompatible types:FutureWarning"
)

VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])  # ASE's xx yy zz yz xz xy
TRICLINIC = np.array([[7.2, 0.0, 0.0], [1.1, 7.1, 0.0], [0.7, -0.9, 7.3]])  # widths > 6.4 Å


@pytest.fixture(scope="module")
def pot():
  return tiny_copper_potential(3.0)


def fcc32(cell) -> ase.Atoms:
  """32 rattled Cu atoms on fcc sites mapped into ``cell`` (wider than 2 * cutoff)."""
  frac = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2).get_scaled_positions()
  atoms = ase.Atoms("Cu32", scaled_positions=frac, cell=cell, pbc=True)
  atoms.rattle(0.08, seed=2)
  atoms.wrap()
  return atoms


def small() -> ase.Atoms:
  """4 rattled atoms in a 3.6 Å cubic cell: every atom pairs with its own images."""
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  atoms.rattle(0.06, seed=5)
  atoms.wrap()
  return atoms


STRUCTURES = {
  "orthorhombic": lambda: fcc32(np.diag([7.25, 7.2, 7.3])),
  "triclinic": lambda: fcc32(TRICLINIC),
  "small": small,
}


def evaluate(pot, atoms):
  """(stress (6,), stresses (N, 6)) of a float64 calculator."""
  atoms = atoms.copy()
  atoms.calc = Calculator(pot, dtype="float64")
  return atoms.get_stress(), atoms.get_stresses()


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_stresses_sum_to_stress(pot, name):
  atoms = STRUCTURES[name]()
  atoms.calc = Calculator(pot, dtype="float64")
  stress = atoms.get_stress()
  compilations = atoms.calc.num_compilations
  stresses = atoms.get_stresses()  # from the same evaluation: nothing new runs
  assert "stresses" in atoms.calc.results and atoms.calc.num_compilations == compilations
  assert stresses.shape == (len(atoms), 6)
  err = np.abs(stresses.sum(0) - stress).max()
  print(
    f"{name}: max |sum(stresses) - stress| = {err:.1e} eV/Å³ "
    f"(max |stress| {np.abs(stress).max():.1e})"
  )
  assert np.abs(stress).max() > 1e-4
  # not a trivial split (every atom stress / N): the rattled atoms differ
  assert np.abs(stresses - stress / len(atoms)).max() > 1e-2 * np.abs(stress).max()
  assert err < 1e-10
  # voigt=False gives ASE's symmetric 3x3 form of the same numbers
  full = atoms.get_stresses(voigt=False)
  np.testing.assert_array_equal(full[:, VOIGT[0], VOIGT[1]], stresses)


def test_stresses_float32(pot):
  atoms = small()
  atoms.calc = Calculator(pot, dtype="float32")
  stresses, stress = atoms.get_stresses(), atoms.get_stress()
  assert stresses.dtype == np.float64  # what ASE expects, whatever the evaluation dtype
  _, reference = evaluate(pot, atoms)
  np.testing.assert_allclose(stresses, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
  np.testing.assert_allclose(stresses.sum(0), stress, rtol=0, atol=1e-6 * np.abs(stress).max())


@pytest.mark.parametrize("name", ["triclinic", "small"])
def test_stresses_invariant_under_rigid_translation(pot, name):
  atoms = STRUCTURES[name]()
  moved = atoms.copy()
  moved.positions += np.array([0.37, -1.21, 2.9])  # not a lattice vector
  (s0, ss0), (s1, ss1) = evaluate(pot, atoms), evaluate(pot, moved)
  np.testing.assert_allclose(ss1, ss0, rtol=0, atol=1e-12 * np.abs(ss0).max())
  np.testing.assert_allclose(s1, s0, rtol=0, atol=1e-12 * np.abs(s0).max())


def test_small_cell_stresses_tile_the_supercell(pot):
  """A pair of an atom with its own image goes wholly to that atom; in the supercell the same
  pair joins two copies, each taking half: per-atom virials agree (stresses scale as 1/V)."""
  cell = small()
  reps = (2, 2, 2)
  _, ss_small = evaluate(pot, cell)
  _, ss_large = evaluate(pot, cell.repeat(reps))
  np.testing.assert_allclose(
    ss_large, np.tile(ss_small, (8, 1)) / 8, rtol=0, atol=1e-12 * np.abs(ss_small).max()
  )


def test_symmetry_equivalent_atoms_have_equal_virials(pot):
  # perfect fcc, 4 atoms related by lattice translations: equal, isotropic
  fcc = ase.build.bulk("Cu", "fcc", a=3.55, cubic=True)
  stress, ss = evaluate(pot, fcc)
  tol = 1e-12 * np.abs(stress).max()
  assert np.abs(stress[:3]).max() > 1e-4
  np.testing.assert_allclose(ss, np.tile(stress / 4, (4, 1)), rtol=0, atol=tol)
  np.testing.assert_allclose(ss[:, :3], ss[:, [1, 2, 0]], rtol=0, atol=tol)
  np.testing.assert_allclose(ss[:, 3:], 0, atol=tol)
  # hcp: the two atoms are related by the 6_3 screw axis (a rotation, not a translation) and
  # sit on sites with a 3-fold axis along z: equal, xx = yy, no shear
  hcp = ase.build.bulk("Cu", "hcp", a=2.6, c=4.2)
  stress, ss = evaluate(pot, hcp)
  tol = 1e-12 * np.abs(stress).max()
  assert np.abs(stress[:3]).max() > 1e-4 and abs(stress[0] - stress[2]) > 1e-6
  np.testing.assert_allclose(ss[0], ss[1], rtol=0, atol=tol)
  np.testing.assert_allclose(ss[:, 0], ss[:, 1], rtol=0, atol=tol)
  np.testing.assert_allclose(ss[:, 3:], 0, atol=tol)


def test_open_systems_have_no_stresses(pot):
  """No volume, no per-atom stress (as for ``stress``); observables defines the open-system
  per-atom strain derivative (tests/test_observables.py)."""
  from ase.calculators.calculator import PropertyNotImplementedError

  atoms = ase.Atoms("Cu3", positions=[[0, 0, 0], [2.4, 0, 0], [0.3, 2.3, 0.4]])
  atoms.calc = Calculator(pot, dtype="float64")
  assert np.isfinite(atoms.get_potential_energy())
  with pytest.raises(PropertyNotImplementedError, match="stresses needs a fully periodic cell"):
    atoms.get_stresses()


# --------------------------------------------------------------------------------------------
# JAX-MD


def jax_md_case(pot, name):
  """(atoms, R, neighbor_fn, energy_fn, box, shift_fn): the triclinic cell in fractional
  coordinates (JAX-MD's own list), the small cell in real ones (an ImageNeighborList)."""
  atoms = STRUCTURES[name]()
  if name == "triclinic":
    box = atoms.cell.array.T
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
    R = atoms.get_scaled_positions()
  else:
    box = atoms.cell.lengths()
    displacement_fn, shift_fn = space.periodic(box)
    R = atoms.positions
  nfn, efn = pjm.neighbor_list(
    pot,
    displacement_fn,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=0.2,
    fractional_coordinates=name == "triclinic",
  )
  return atoms, jnp.asarray(R), nfn, efn, jnp.asarray(box), shift_fn


@pytest.mark.parametrize("name", ["triclinic", "small"])
def test_jax_md_atom_virials_match_ase(pot, name):
  atoms, R, nfn, efn, box, _ = jax_md_case(pot, name)
  nbrs = nfn.allocate(R)
  assert isinstance(nbrs, pjm.ImageNeighborList) == (name == "small")
  virial_fn = pjm.atom_virial_fn(efn)
  general = name == "triclinic"

  @jax.jit
  def fns(R, nbrs):
    out = virial_fn(R, nbrs), quantity.stress(efn, R, box, neighbor=nbrs)
    if general:  # a box passed at call time (NPT): strained, and too narrow for the list
      out += (
        virial_fn(R, nbrs, box=1.02 * box),
        quantity.stress(efn, R, 1.02 * box, neighbor=nbrs),
        virial_fn(R, nbrs, box=0.8 * box),
      )
    return out

  w, stress, *moved = (np.asarray(x) for x in fns(R, nbrs))
  volume = atoms.get_volume()
  if general:
    np.testing.assert_allclose(moved[0].sum(0) / (1.02**3 * volume), moved[1], rtol=0, atol=1e-10)
    assert np.abs(moved[0] - w).max() > 1e-3 * np.abs(w).max()
    assert np.isnan(moved[2]).all()  # never silently wrong (as energy_fn)
  assert w.shape == (len(atoms), 3, 3)
  np.testing.assert_allclose(w, np.swapaxes(w, 1, 2), atol=1e-14 * np.abs(w).max())
  # JAX-MD's sign: sum W_i / V is quantity.stress; ASE's per-atom stress is -W_i / V
  np.testing.assert_allclose(w.sum(0) / volume, stress, rtol=0, atol=1e-10)
  _, ss = evaluate(pot, atoms)
  ours = -w[:, VOIGT[0], VOIGT[1]] / volume
  err = np.abs(ours - ss).max() / np.abs(ss).max()
  print(f"{name}: JAX-MD vs ASE per-atom stress, relative difference {err:.1e}")
  assert err < 1e-10


def test_jax_md_atom_virials_inside_a_jitted_loop(pot):
  atoms, R, nfn, efn, box, shift_fn = jax_md_case(pot, "small")
  virial_fn = pjm.atom_virial_fn(efn)
  init, apply = simulate.nve(efn, shift_fn, dt=0.05)
  nbrs = nfn.allocate(R)
  state = init(jax.random.PRNGKey(0), R, kT=0.05, mass=63.5, neighbor=nbrs)

  @jax.jit
  def steps(state, nbrs):
    def step(carry, _):
      state, nbrs = carry
      nbrs = nbrs.update(state.position)
      state = apply(state, neighbor=nbrs)
      return (state, nbrs), (state.position, virial_fn(state.position, nbrs))

    return jax.lax.scan(step, (state, nbrs), None, length=3)

  (state, nbrs), (positions, virials) = steps(state, nbrs)
  assert not nbrs.did_buffer_overflow and np.isfinite(np.asarray(virials)).all()
  assert np.abs(np.asarray(virials[2] - virials[0])).max() > 0  # atoms moved
  again = jax.jit(virial_fn)(positions[2], nbrs)
  np.testing.assert_allclose(virials[2], again, rtol=0, atol=1e-12 * np.abs(again).max())


def test_atom_virial_fn_needs_an_eqattn_energy_fn():
  with pytest.raises(TypeError, match="plugin.jax_md.neighbor_list"):
    pjm.atom_virial_fn(lambda R, neighbor: jnp.sum(R))
