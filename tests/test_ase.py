"""Tests of plugin.ase.Calculator: physics (finite differences, invariances, small cells), dtypes,
compilation counts under MD/NPT, system changes and bad input.

The conftest turns on jax x64, so float32 calculators pass ``dtype`` explicitly. One tiny model is
shared by every test; calculators for it share compiled code, so each array shape compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.nptberendsen import NPTBerendsen
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

import potentials
import plugin.ase
from plugin.ase import Calculator

try:  # ase >= 3.29
  from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
  from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

# Large per-element reference energies (as in a real model): float32 runs must not lose them.
SHIFTS = {"H": -13.6, "C": -1029.8, "O": -2041.2, "Cu": -44960.0}


@pytest.fixture(scope="module")
def pot() -> potentials.Potential:
  """Tiny random model with zero reference energies (finite differences stay precise)."""
  p = potentials.Potential.create(
    0,
    species=list(SHIFTS),
    cutoff=3.0,
    features=8,
    max_degree=1,
    num_iterations=2,
    num_heads=2,
    num_basis=6,
  )
  params = dict(p.params)
  # The random model is nearly flat; a larger scale gives forces of ~0.1-1 eV/Å to test.
  params["scale"] = jnp.full(len(SHIFTS), 20.0, jnp.float32)
  return p.replace(params=params)


@pytest.fixture(scope="module")
def shifted(pot) -> potentials.Potential:
  """The same model with large per-element reference energies, as a trained model has.
  Same architecture, so it shares compiled code with ``pot``."""
  params = dict(pot.params)
  params["shift"] = jnp.asarray(list(SHIFTS.values()), jnp.float32)
  return pot.replace(params=params)


def ethanol() -> Atoms:
  return molecule("CH3CH2OH")


def copper_cell() -> Atoms:
  """Orthorhombic (cubic) 4-atom cell with one O, rattled: all pairs are distinct."""
  atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
  atoms.symbols[1] = "O"
  atoms.rattle(0.1, seed=1)
  return atoms


def triclinic_cell() -> Atoms:
  """3 atoms in a skewed cell narrower than twice the cutoff (periodic self-images)."""
  cell = np.array([[3.2, 0.0, 0.0], [1.1, 3.4, 0.0], [0.7, -0.9, 3.6]])
  frac = np.array([[0.1, 0.2, 0.3], [0.45, 0.6, 0.55], [0.8, 0.15, 0.9]])
  return Atoms("CHO", scaled_positions=frac, cell=cell, pbc=True)


def random_rotation(seed: int) -> np.ndarray:
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  return q if np.linalg.det(q) > 0 else -q


# ------------------------------------------------------------------ physics (float64)


@pytest.mark.parametrize(
  "make", [copper_cell, triclinic_cell, ethanol], ids=["orthorhombic", "triclinic", "open"]
)
def test_forces_match_finite_differences(pot, make):
  atoms = make()
  atoms.calc = Calculator(pot, dtype="float64")
  forces = atoms.get_forces()
  numerical = calculate_numerical_forces(atoms, eps=1e-4)
  err = np.abs(forces - numerical).max()
  assert np.abs(forces).max() > 1e-2  # not trivially zero
  assert err < 1e-7 * max(1.0, np.abs(forces).max()), err


@pytest.mark.parametrize("make", [copper_cell, triclinic_cell], ids=["orthorhombic", "triclinic"])
def test_stress_matches_finite_differences(pot, make):
  atoms = make()
  atoms.calc = Calculator(pot, dtype="float64")
  stress = atoms.get_stress()
  # ASE's own finite-difference stress: (E(cell (I + eps)) - E(cell (I - eps))) / (2 eps V)
  numerical = calculate_numerical_stress(atoms, eps=1e-5)
  assert stress.shape == (6,)
  assert np.abs(stress).max() > 1e-4
  assert np.abs(stress - numerical).max() < 1e-8, stress - numerical


def test_stress_sign_convention_is_ase_s():
  """The finite-difference reference above follows ASE: it reproduces EMT's analytic stress,
  negative for a compressed crystal."""
  atoms = bulk("Cu", "fcc", a=3.5, cubic=True)  # compressed (EMT's a0 is ~3.59)
  atoms.calc = EMT()
  stress = atoms.get_stress()
  assert np.all(stress[:3] < 0)
  np.testing.assert_allclose(calculate_numerical_stress(atoms, eps=1e-6), stress, atol=1e-7)


@pytest.mark.parametrize(
  "small, reps",
  [
    (bulk("Cu", "fcc", a=3.6), (3, 3, 3)),  # one-atom primitive cell, 2.55 Å vectors
    (triclinic_cell(), (2, 3, 2)),
  ],
  ids=["Cu-primitive", "triclinic"],
)
def test_small_cell_matches_supercell(pot, small, reps):
  small = small.copy()
  small.calc = Calculator(pot, dtype="float64")
  large = small.repeat(reps)
  large.calc = Calculator(pot, dtype="float64")
  n = len(small)
  e_small = small.get_potential_energy() / n
  e_large = large.get_potential_energy() / len(large)
  assert abs(e_small - e_large) <= 1e-8 * abs(e_small)
  # also per atom, forces (the supercell tiles the small cell's atoms) and stress
  np.testing.assert_allclose(
    large.get_potential_energies(),
    np.tile(small.get_potential_energies(), np.prod(reps)),
    rtol=1e-10,
  )
  np.testing.assert_allclose(
    large.get_forces(), np.tile(small.get_forces(), (np.prod(reps), 1)), atol=1e-10
  )
  np.testing.assert_allclose(large.get_stress(), small.get_stress(), atol=1e-11)


def test_open_molecule_translation_rotation(pot):
  atoms = ethanol()
  atoms.calc = Calculator(pot, dtype="float64")
  e0, f0 = atoms.get_potential_energy(), atoms.get_forces()
  rot = random_rotation(7)
  moved = atoms.copy()
  moved.positions = atoms.positions @ rot.T + np.array([13.0, -250.0, 4.2])
  moved.calc = Calculator(pot, dtype="float64")
  assert abs(moved.get_potential_energy() - e0) < 1e-10
  np.testing.assert_allclose(moved.get_forces(), f0 @ rot.T, atol=1e-10)
  np.testing.assert_allclose(f0.sum(axis=0), 0.0, atol=1e-10)  # no net force


def test_energies_sum_and_free_energy(shifted):
  for atoms in (ethanol(), copper_cell()):
    atoms.calc = Calculator(shifted, dtype="float64")
    e = atoms.get_potential_energy()
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert abs(energies.sum() - e) < 1e-9
    assert atoms.get_potential_energy(force_consistent=True) == e  # free_energy
    assert atoms.calc.results["free_energy"] == e
  # the per-element reference energies are in the per-atom energies
  assert abs(e - sum(SHIFTS[s] for s in atoms.get_chemical_symbols())) < 10.0


def test_lone_atom_has_reference_energy(shifted):
  atoms = Atoms("O", positions=[[1.0, 2.0, 3.0]])
  atoms.calc = Calculator(shifted, dtype="float64")
  assert atoms.get_potential_energy() == pytest.approx(SHIFTS["O"], abs=1e-4)
  np.testing.assert_array_equal(atoms.get_forces(), 0.0)


def test_empty_atoms(pot):
  atoms = Atoms()
  atoms.calc = Calculator(pot, dtype="float64")
  assert atoms.get_potential_energy() == 0.0
  assert atoms.get_forces().shape == (0, 3)
  periodic = Atoms(cell=[3.0, 3.0, 3.0], pbc=True)
  periodic.calc = Calculator(pot, dtype="float64")
  np.testing.assert_array_equal(periodic.get_stress(), np.zeros(6))
  assert periodic.get_stresses().shape == (0, 6)


# ------------------------------------------------------------------ dtypes


def test_float32(shifted):
  atoms = copper_cell()
  ref = Calculator(shifted, dtype="float64")
  e64, f64, s64 = (ref.get_potential_energy(atoms), ref.get_forces(atoms), ref.get_stress(atoms))
  for dtype in ("float32", np.float32, jnp.float32):
    calc = Calculator(shifted, dtype=dtype)
    assert calc.dtype == np.float32
    e, f, s = calc.get_potential_energy(atoms), calc.get_forces(atoms), calc.get_stress(atoms)
    assert isinstance(e, float) and f.dtype == np.float64 and s.dtype == np.float64
    # energies of ~1e5 eV keep float32 *relative* precision of the interaction part only
    assert abs(e - e64) < 1e-4
    assert 0 < np.abs(f - f64).max() < 1e-4  # really computed in float32, and accurately
    assert np.abs(s - s64).max() < 1e-5


def test_dtype_errors(pot):
  for bad in ("float16", "int32", jnp.bfloat16, "complex64"):
    with pytest.raises(ValueError, match="float32"):
      Calculator(pot, dtype=bad)
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match="jax_enable_x64"):
      Calculator(pot, dtype="float64")
    # one dtype rule for every engine: None is JAX's default float
    from plugin import host
    from plugin.md.settings import resolve_dtype

    assert host.resolve_dtype(None) == resolve_dtype(None) == np.float32
  assert host.resolve_dtype(None) == Calculator(pot, dtype=None).dtype == np.float64
  assert jax.config.jax_enable_x64  # left as it was


# ------------------------------------------------------------------ dynamics and compilations


def test_molecular_dynamics_compiles_at_most_twice_after_warmup(pot):
  atoms = ethanol()
  calc = Calculator(pot, dtype="float32")
  atoms.calc = calc
  thermalize_momenta(atoms, temperature_K=500, rng=np.random.default_rng(0))
  Stationary(atoms)
  dyn = Langevin(
    atoms,
    0.5 * units.fs,
    temperature_K=500,
    friction=0.02,
    fixcm=False,
    rng=np.random.default_rng(1),
  )
  pairs = []
  dyn.attach(lambda: pairs.append(calc.neighbors.num_pairs))
  dyn.run(10)  # warm-up
  warm = calc.num_compilations
  dyn.run(200)
  assert np.isfinite(atoms.get_potential_energy())
  assert len(set(pairs)) > 3  # pairs did cross the cutoff
  assert calc.num_compilations - warm <= 2, calc.num_compilations - warm
  # NVE on top of it: energy conservation to the thermal-noise level, no new compilations
  nve = VelocityVerlet(atoms, 0.25 * units.fs)
  e0 = atoms.get_total_energy()
  nve.run(40)
  assert abs(atoms.get_total_energy() - e0) < 0.02
  assert calc.num_compilations - warm <= 2


def test_npt_compiles_at_most_twice_after_warmup(pot):
  # Lattice chosen so that the nearest-neighbour shell (2.97 Å) straddles the 3 Å cutoff of the
  # tiny model: the pair count changes every step, the worst case for compilations.
  atoms = bulk("Cu", "fcc", a=4.2, cubic=True).repeat(2)
  calc = Calculator(pot, dtype="float32")
  atoms.calc = calc
  thermalize_momenta(atoms, temperature_K=500, rng=np.random.default_rng(0))
  dyn = NPTBerendsen(
    atoms,
    1.0 * units.fs,
    temperature_K=500,
    pressure_au=0.0,
    taut=50 * units.fs,
    taup=200 * units.fs,
    compressibility_au=1e-2,
  )
  pairs, volumes = [], []
  dyn.attach(lambda: (pairs.append(calc.neighbors.num_pairs), volumes.append(atoms.get_volume())))
  dyn.run(10)  # warm-up
  warm = calc.num_compilations
  dyn.run(100)
  assert np.isfinite(atoms.get_potential_energy())
  assert len(set(pairs)) > 3 and np.ptp(volumes) > 0  # pairs cross the cutoff, cell changes
  assert calc.num_compilations - warm <= 2, calc.num_compilations - warm


def test_optimizers_and_cell_filter(pot):
  mol = ethanol()
  mol.calc = Calculator(pot, dtype="float64")
  BFGS(mol, logfile=None).run(fmax=0.05, steps=30)
  assert np.isfinite(mol.get_potential_energy())
  crystal = triclinic_cell()
  crystal.calc = Calculator(pot, dtype="float64")
  e0 = crystal.get_potential_energy()
  # few steps: scipy's expm_frechet in the filter is slow on this shared machine
  FIRE(FrechetCellFilter(crystal), logfile=None).run(fmax=0.05, steps=8)
  assert crystal.get_potential_energy() < e0


# ------------------------------------------------------------------ system changes


def test_system_changes(pot):
  calc = Calculator(pot, dtype="float64")
  atoms = ethanol()
  atoms.calc = calc

  def fresh(a: Atoms) -> float:
    return Calculator(pot, dtype="float64").get_potential_energy(a)

  atoms.get_potential_energy()  # warm-up
  before = calc.num_compilations
  atoms.append("H")  # 9 -> 10 atoms: same padded atom axis
  atoms.positions[-1] = atoms.positions[0] + [0.0, 0.0, 2.2]
  assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), abs=1e-10)
  assert len(atoms.get_forces()) == 10 and len(atoms.get_potential_energies()) == 10
  atoms.symbols[0] = "O"  # species change
  assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), abs=1e-10)
  del atoms[[1, -1]]  # remove atoms
  assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), abs=1e-10)
  assert calc.num_compilations - before <= 1  # at most a larger pair capacity
  # open -> periodic: stress appears
  with pytest.raises(PropertyNotImplementedError, match="periodic"):
    atoms.get_stress()
  atoms.set_cell([6.0, 6.5, 7.0])
  atoms.center()
  atoms.pbc = True
  assert atoms.get_stress().shape == (6,)
  # a completely different system with the same calculator
  cu = copper_cell()
  cu.calc = calc
  assert cu.get_potential_energy() == pytest.approx(fresh(cu), abs=1e-10)
  assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), abs=1e-10)


# ------------------------------------------------------------------ bad input


def test_unknown_element(pot):
  atoms = molecule("CH3CONH2")  # N is not in the model
  atoms.calc = Calculator(pot)
  with pytest.raises(potentials.UnknownElementError, match=r"N \(Z=7\).*H, C, O, Cu"):
    atoms.get_potential_energy()


def test_non_finite_positions(pot):
  atoms = ethanol()
  atoms.calc = Calculator(pot)
  atoms.positions[4, 1] = np.nan
  with pytest.raises(ValueError, match="atom 4 .*not finite"):
    atoms.get_forces()
  atoms.positions[4, 1] = np.inf
  with pytest.raises(ValueError, match="not finite"):
    atoms.get_forces()


def test_bad_cells(pot):
  atoms = copper_cell()
  atoms.calc = Calculator(pot)
  atoms.set_cell([[3.6, 0, 0], [3.6, 0, 0], [0, 0, 3.6]])  # two equal vectors
  with pytest.raises(ValueError, match="singular"):
    atoms.get_potential_energy()
  atoms.set_cell(np.zeros((3, 3)))
  with pytest.raises(ValueError, match="zero length"):
    atoms.get_potential_energy()
  atoms.set_cell(np.diag([3.6, 3.6, 0.0]))
  with pytest.raises(ValueError, match="zero length"):
    atoms.get_potential_energy()


def test_overlapping_atoms(pot):
  # float64: reuses shapes compiled above (the check does not depend on the dtype)
  atoms = ethanol()
  atoms.calc = Calculator(pot, dtype="float64")
  atoms.positions[3] = atoms.positions[0] + [0.03, 0.0, 0.0]
  with pytest.raises(ValueError, match=r"atoms 0 \(C\) and 3 \(H\) are only 0.03 Å apart"):
    atoms.get_potential_energy()
  with pytest.raises(ValueError, match="apart"):  # no stale result after an error
    atoms.get_forces()
  # the check can be turned off; the model's repulsion keeps the energy finite
  atoms.calc = Calculator(pot, dtype="float64", min_distance=None)
  assert np.isfinite(atoms.get_potential_energy())
  # an atom too close to its own periodic image (a larger min_distance to keep the cell sane)
  cu = bulk("Cu", "fcc", a=3.6)
  cu.calc = Calculator(pot, dtype="float64", min_distance=2.6)
  with pytest.raises(ValueError, match=r"atom 0 \(Cu\) and its own periodic image are only 2.55"):
    cu.get_potential_energy()


def test_stress_needs_periodic_cell(pot):
  atoms = ethanol()
  atoms.calc = Calculator(pot)
  with pytest.raises(PropertyNotImplementedError, match="periodic"):
    atoms.get_stress()
  slab = copper_cell()
  slab.pbc = [True, True, False]
  slab.calc = Calculator(pot)
  assert np.isfinite(slab.get_potential_energy())
  with pytest.raises(PropertyNotImplementedError, match="periodic"):
    slab.get_stress()
  with pytest.raises(PropertyNotImplementedError, match="stresses needs a fully periodic"):
    slab.get_stresses()


def test_bad_arguments(pot):
  with pytest.raises(TypeError, match="Potential"):
    Calculator("model.eqm")
  with pytest.raises(ValueError, match="min_distance"):
    Calculator(pot, min_distance=-1.0)


def test_evaluate_many_structures_in_few_compilations():
  """plugin.ase.calculate_many: 40 structures of 13 sizes (open molecules and clusters, cubic,
  triclinic and small periodic cells) agree with the calculator structure by structure
  (float64) and compile only one program per size bucket."""
  import ase.build
  from conftest import random_cluster, tiny_copper_potential
  from plugin.data import frame_from_atoms
  from potentials import training
  from potentials.training import evaluation

  pot = tiny_copper_potential()
  structures = []
  for k in range(40):
    kind = k % 4
    if kind == 0:
      a = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1 + k % 3, 1, 1))
    elif kind == 1:
      a = ase.build.bulk("Cu", "fcc", a=3.6).repeat((1 + k % 2, 2, 2))  # triclinic, images
    elif kind == 2:
      n = 3 + k % 7
      a = ase.Atoms(f"Cu{n}", positions=random_cluster(n, seed=k, box=2.2 * n ** (1 / 3) + 1))
    else:
      a = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)  # 4 atoms: a small cell
    a.rattle(0.05, seed=k)
    structures.append(a)
  predict = evaluation._jitted_predict(pot.config, pot.species)
  before = predict._cache_size()
  out = plugin.ase.calculate_many(
    pot, structures, dtype="float64", batch_size=8, properties=("energy", "forces", "stress")
  )
  frames = [frame_from_atoms(a, pot.cutoff) for a in structures]
  shapes = {caps for _, caps in training.buckets(frames, 8, 4096)}
  assert predict._cache_size() - before <= len(shapes) <= 6
  calc = plugin.ase.Calculator(pot, dtype="float64")
  for a, r in zip(structures, out):
    b = a.copy()
    b.calc = calc
    assert r["energy"] == pytest.approx(b.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(r["forces"], b.get_forces(), atol=1e-9)
    if a.pbc.all():
      np.testing.assert_allclose(r["stress"], b.get_stress(), atol=1e-10)
    else:
      assert r["stress"] is None
  with pytest.raises(ValueError, match="unknown properties"):
    plugin.ase.calculate_many(pot, structures[:1], properties=("magmoms",))
  with pytest.raises(potentials.UnknownElementError):
    plugin.ase.calculate_many(pot, [ase.Atoms("H")])
  with pytest.warns(DeprecationWarning, match="plugin.ase.evaluate is deprecated"):
    old = plugin.ase.evaluate(pot, structures[:3], dtype="float64", batch_size=8)
  assert [r["energy"] for r in old] == [r["energy"] for r in out[:3]]


def test_refused_before_allocating_and_the_calculator_recovers(pot, monkeypatch):
  # structures whose pairs need more memory than is available are refused on the host, before
  # the model runs (overlapping atoms named, else the figure), and a failed call leaves the
  # calculator as usable as before (the failed structure's pair capacity is not kept)
  from plugin import host

  calc = Calculator(pot, dtype="float64")
  cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
  cu.numbers[:] = 1  # the tiny model's species
  cu.calc = calc
  e0 = cu.get_potential_energy()
  capacity = calc.neighbors.capacity
  flat = Atoms("H4", positions=[[0, 0, 0], [2, 0, 0], [0, 2, 0], [2, 2, 0]], pbc=True)
  flat.cell = [4.0, 4.0, 0.05]
  need = host.pair_memory_bytes(pot.config, 10**6, np.float64)
  monkeypatch.setattr(host, "available_memory_bytes", lambda: need // 10**4)
  flat.calc = calc
  with pytest.raises(ValueError, match="its own periodic image are only 0.05 Å apart"):
    flat.get_potential_energy()
  calc.min_distance = None
  with pytest.raises(MemoryError, match=r"GiB for its \d+ pairs .* nothing was allocated"):
    flat.get_potential_energy()
  monkeypatch.undo()
  calc.min_distance = 0.1
  assert cu.get_potential_energy() == e0 and calc.neighbors.capacity <= 2 * capacity
