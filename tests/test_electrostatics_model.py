"""A model with learnt charges (ModelConfig.electrostatics): per-atom electrostatics of
batches against the whole-system sums, neutrality, invariances, forces and stress against
finite differences, padding, training and files, and engines that must refuse (float64)."""

import math

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import potentials
from plugin.ase import Calculator
from plugin.data import frame_from_atoms
from potentials import electrostatics as es
from potentials import training

jax.config.update("jax_enable_x64", True)

CUTOFF = 3.0


@pytest.fixture(scope="module")
def charged():
  """A tiny random model with learnt charges (Na, Cl) moved along pairs, tight Ewald
  truncation."""
  return potentials.Potential.create(
    1,
    species=["Na", "Cl"],
    cutoff=CUTOFF,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=2,
    num_basis=6,
    electrostatics=True,
    charge_width=0.5,
    ewald_accuracy=1e-10,
    charge_transfer=True,  # the default per-atom read-out: the command-line and md tests
  )


def calc(potential):
  return Calculator(potential, dtype="float64", min_distance=None)


def dimer_pair(distance):
  """Two Na-Cl dimers ``distance`` Å apart (no atoms within any model reach of the other)."""
  one = ase.Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0.3, 0.1]])
  two = one.copy()
  two.rotate(70, "z")
  two.translate([0.2, distance, 0.5])
  return one, two, one + two


def rattled_salt(seed=0):
  atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64, cubic=True)
  atoms.rattle(0.08, seed=seed)
  return atoms


def energy(potential, atoms):
  atoms = atoms.copy()
  atoms.calc = calc(potential)
  return atoms.get_potential_energy(), atoms


def test_per_atom_energies_of_a_batch_sum_to_the_whole_system_sums():
  rng = np.random.default_rng(0)
  salt = rattled_salt()
  q_salt = np.where(salt.numbers == 11, 0.8, -0.8) + 0.05 * rng.standard_normal(8)
  mol = rng.uniform(0, 3, (5, 3))
  q_mol = rng.standard_normal(5)
  sigma, cutoff, acc = 0.6, 4.0, 1e-10
  # one batch: the salt (periodic), the molecule (open), then two padded atoms
  pos = np.concatenate([salt.positions, mol, np.zeros((2, 3))])
  frame = np.array([0] * 8 + [1] * 5 + [2, 2])
  mask = frame < 2
  raw = np.concatenate([q_salt, q_mol, [3.0, -1.0]])  # padding's values must not count
  cells = np.stack([salt.cell.array, np.zeros((3, 3))])
  kvec, kmask = es.kvector_table(cells, [True, False], cutoff, acc)
  frames = es.Frames(*map(jnp.asarray, (frame, mask, [0.0, -1.0], [True, False], kvec, kmask)))
  q = es.neutral_charges(jnp.asarray(raw), frames)
  np.testing.assert_allclose([q[:8].sum(), q[8:13].sum(), q[13:].sum()], [0, -1, 0], atol=1e-12)
  np.testing.assert_allclose(q[8:13], q_mol - (q_mol.sum() + 1) / 5, atol=1e-12)
  w = jnp.asarray(np.concatenate([np.ones(8), [1.0, 3.0, 0.0, 0.0, 0.0], [1.0, 1.0]]))
  weighted = es.neutral_charges(jnp.asarray(raw), frames, w)  # the excess where the weight is
  np.testing.assert_allclose(
    weighted[8:13] - q_mol, -(q_mol.sum() + 1) * np.array([1, 3, 0, 0, 0]) / 4, atol=1e-12
  )
  np.testing.assert_allclose(weighted[:8], q[:8], atol=1e-12)
  from ase.neighborlist import primitive_neighbor_list

  i, j, s = primitive_neighbor_list("ijS", (True,) * 3, salt.cell.array, salt.positions, cutoff)
  dst = np.concatenate([i, np.full(3, 15)])  # padded pairs
  src = np.concatenate([j, np.full(3, 15)])
  r = salt.positions[j] - salt.positions[i] + s @ salt.cell.array
  r = np.concatenate([r, np.zeros((3, 3))])
  alpha = es.alpha_for(cutoff, acc)
  args = (jnp.asarray(pos), jnp.asarray(cells), jnp.asarray(r), dst, src, q, frames)
  e = es.atom_energies(*args, sigma=sigma, alpha=alpha, cutoff=cutoff)
  params = es.ewald_parameters(salt.cell.array, cutoff, acc)
  whole = es.ewald_energy(
    jnp.asarray(salt.positions), q[:8], jnp.asarray(salt.cell.array), jnp.asarray(r[:-3]),
    jnp.asarray(i), jnp.asarray(j), params=params, sigma=sigma,
  )  # fmt: skip
  assert float(jnp.sum(e[:8])) == pytest.approx(float(whole), rel=1e-10)
  alone = es.open_energy(jnp.asarray(mol), q[8:13], sigma=sigma)
  assert float(jnp.sum(e[8:13])) == pytest.approx(float(alone), rel=1e-10)
  assert np.all(np.asarray(e[13:]) == 0)


def test_charges_sum_to_the_total_and_reach_beyond_the_receptive_field(charged):
  one, two, both = dimer_pair(14.0)
  assert 14.0 > charged.receptive_field + 2.5
  e1, a1 = energy(charged, one)
  e2, a2 = energy(charged, two)
  e12, a12 = energy(charged, both)
  q1, q2, q12 = (a.calc.results["charges"] for a in (a1, a2, a12))
  assert abs(q1.sum()) < 1e-12 and abs(q12.sum()) < 1e-12
  assert np.max(np.abs(q1)) > 0.05  # the test sees charges
  # identical neutral molecules keep their charges; they interact by Coulomb's law alone
  np.testing.assert_allclose(q12, np.concatenate([q1, q2]), atol=1e-12)
  d = np.linalg.norm(one.positions[:, None] - two.positions[None], axis=-1)
  coulomb = es.COULOMB * np.sum(q1[:, None] * q2[None] * np.vectorize(math.erf)(d) / d)
  assert e12 - e1 - e2 == pytest.approx(coulomb, rel=1e-9)
  assert abs(coulomb) > 1e-4  # ~20 times the tolerance of the equality above
  # charge moves only between atoms within the cutoff: a neutral molecule far from another,
  # different one stays neutral (a per-atom read-out would share their excess)
  stretched = two.copy()
  stretched.positions[1] += 0.3 * (stretched.positions[1] - stretched.positions[0])
  _, a = energy(charged, one + stretched)
  q = a.calc.results["charges"]
  assert abs(q[:2].sum()) < 1e-12 and abs(q[2:].sum()) < 1e-12
  assert np.abs(q[2:] - q2).max() > 1e-3  # the stretched molecule's charges did change
  # a charged system: its charges sum to atoms.info["charge"]
  ion = one.copy()
  ion.info["charge"] = 1.0
  _, a = energy(charged, ion)
  assert a.calc.results["charges"].sum() == pytest.approx(1.0, abs=1e-12)


def test_invariances_and_padding(charged):
  _, _, both = dimer_pair(7.0)
  e0, a0 = energy(charged, both)
  moved = both.copy()
  moved.rotate(37, [1, 2, 3])
  moved.positions = -moved.positions + [3, -1, 2]  # a rotation, an inversion, a shift
  e1, a1 = energy(charged, moved)
  assert e1 == pytest.approx(e0, rel=1e-10)
  order = [3, 1, 0, 2]
  e2, a2 = energy(charged, both[order])
  assert e2 == pytest.approx(e0, rel=1e-10)
  np.testing.assert_allclose(a2.calc.results["charges"], a0.calc.results["charges"][order])
  # padded atoms: the same structure in a calculator whose atom axis was fitted to more atoms
  c = calc(charged)
  big = both + both.copy()
  big.positions[4:] += [0, 30, 0]
  big.calc = c
  big.get_potential_energy()
  small = both.copy()
  small.calc = c
  assert c.atom_capacity > len(small)
  assert small.get_potential_energy() == pytest.approx(e0, rel=1e-10)


def test_periodic_energy_forces_and_stress(charged):
  salt = rattled_salt()
  e, a = energy(charged, salt)
  forces, stress = a.get_forces(), a.get_stress(voigt=False)
  stresses = a.calc.results["stresses"]
  np.testing.assert_allclose(stresses.sum(axis=0), a.get_stress(), atol=1e-10)
  # forces and stress against central differences
  h = 1e-4
  for i, k in [(0, 0), (3, 1), (6, 2)]:
    plus, minus = salt.copy(), salt.copy()
    plus.positions[i, k] += h
    minus.positions[i, k] -= h
    fd = -(energy(charged, plus)[0] - energy(charged, minus)[0]) / (2 * h)
    assert forces[i, k] == pytest.approx(fd, abs=1e-6)
  for i, j in [(0, 0), (0, 1), (2, 2)]:
    eps = np.zeros((3, 3))
    eps[i, j] = eps[j, i] = h
    out = []
    for sign in (1, -1):
      s = salt.copy()
      s.set_cell(salt.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
      out.append(energy(charged, s)[0])
    fd = (out[0] - out[1]) / (2 * h) / salt.get_volume() / (1 if i == j else 2)
    assert stress[i, j] == pytest.approx(fd, abs=1e-7)
  # the cell's choice: a supercell has twice the energy
  e2, _ = energy(charged, salt.repeat((2, 1, 1)))
  assert e2 == pytest.approx(2 * e, rel=1e-8)
  # translation by a non-lattice vector
  moved = salt.copy()
  moved.translate([0.3, -1.1, 2.0])
  assert energy(charged, moved)[0] == pytest.approx(e, rel=1e-10)


def test_batched_training_predictions_equal_the_calculator(charged):
  salt, (_, _, both) = rattled_salt(1), dimer_pair(6.0)
  both.info["charge"] = 0.0
  ion = both[:3]
  ion.info["charge"] = -1.0
  structures = [salt, both, ion]
  frames = []
  for atoms in structures:
    a = atoms.copy()
    a.calc = calc(charged)
    a.get_forces()
    frames.append(frame_from_atoms(a, charged.cutoff))
    frames[-1].charge = float(atoms.info.get("charge", 0.0))
  out = list(training.predictions(charged, frames, batch_size=4, dtype=jnp.float64))
  for b, idx, (e, f, s) in out:
    for slot, i in enumerate(idx):
      ref, _ = energy(charged, structures[i])
      assert e[slot] == pytest.approx(ref, rel=1e-10)
      sel = b.atom_frame == slot
      np.testing.assert_allclose(f[sel], frames[i].forces, atol=1e-9)


def ion_pairs(n=12, seed=3):
  """Na+ Cl- pairs with point-charge energies and a soft repulsion, labelled."""
  from ase.calculators.singlepoint import SinglePointCalculator

  rng = np.random.default_rng(seed)
  structures = []
  for k in range(n):
    d = 2.3 + 0.4 * rng.random()
    atoms = ase.Atoms("NaCl", positions=[[0, 0, 0], [d, 0, 0]])
    atoms.rotate(rng.uniform(0, 180), rng.standard_normal(3))
    e = -es.COULOMB * 0.5 / d + 50 * np.exp(-2 * d)
    f = (es.COULOMB * 0.5 / d**2 - 100 * np.exp(-2 * d)) * (atoms.positions[1] / d)
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=np.stack([f, -f]))
    atoms.info["trajectory"] = str(k % 4)
    structures.append(atoms)
  return structures


@pytest.mark.slow  # the command-line test trains, saves and loads such a model by default
def test_trains_saves_and_loads(charged, tmp_path):
  structures = ion_pairs()
  frames = [frame_from_atoms(a, charged.cutoff) for a in structures]
  cfg = training.TrainConfig(epochs=6, batch_size=4, split="random", learning_rate=5e-3)
  res = training.train(charged, frames, cfg, progress=False)
  losses = [h["train_loss"] for h in res.history]
  assert losses[-1] < losses[0]
  path = tmp_path / "charged.eqm"
  res.potential.save(path)
  back = potentials.load(path)
  assert back.config.electrostatics and back.config.charge_width == 0.5
  a = structures[0].copy()
  assert energy(back, a)[0] == pytest.approx(energy(res.potential, a)[0], rel=1e-12)


def test_old_configs_load_without_and_local_only_paths_refuse(charged):
  old = {k: v for k, v in potentials.ModelConfig().to_dict().items()}
  for key in ("electrostatics", "charge_width", "ewald_accuracy", "charge_transfer"):
    old.pop(key)
  assert not potentials.ModelConfig.from_dict(old).electrostatics
  # files with learnt charges from before charge transfer: the per-atom read-out they had
  before = potentials.ModelConfig.from_dict({**old, "electrostatics": True})
  assert before.electrostatics and not before.charge_transfer
  with pytest.raises(ValueError, match="long-range electrostatics"):
    charged.atomic_energies_from_pairs_fn()
  with pytest.raises(ValueError, match="LAMMPS"):
    charged.stage_fn(0)
  with pytest.raises(ValueError, match="single models"):
    potentials.ModelConfig(electrostatics=True, readout_heads=4)
  # the Ewald accuracy is a run-time setting: a coarser one moves the energy a little
  salt = rattled_salt(4)
  e_fine = energy(charged, salt)[0]
  coarse_salt = energy(charged.with_ewald_accuracy(1e-3), salt)[0]
  assert 1e-7 < abs(coarse_salt - e_fine) < 1e-2 * abs(e_fine)
  assert charged.with_ewald_accuracy(1e-10).config == charged.config
  with pytest.raises(ValueError, match="ewald_accuracy must be in"):
    charged.with_ewald_accuracy(2.0)
  local = potentials.Potential.create(0, species=["Na", "Cl"], features=8, num_iterations=1)
  with pytest.raises(ValueError, match="model with electrostatics"):
    local.with_ewald_accuracy(1e-4)
  slab = rattled_salt()
  slab.pbc = [True, True, False]
  slab.calc = calc(charged)
  with pytest.raises(ValueError, match="fully periodic cell or an open system"):
    slab.get_potential_energy()


def test_command_line_switch_and_total_charge(tmp_path):
  from ase.io import write

  from plugin import cli
  from plugin.data import read_frames

  data = tmp_path / "ions.extxyz"
  structures = ion_pairs(8)
  structures[0].info["charge"] = 0.0  # its own charge wins over --charge
  write(data, structures)
  assert [f.charge for f in read_frames(str(data), 3.0, charge=1.0)][:2] == [0.0, 1.0]
  tiny = '{"features": 8, "num_iterations": 1, "num_basis": 6, "cutoff": 3.0}'
  out = tmp_path / "m.eqm"
  argv = ["train", str(data), "--species", "Na", "Cl", "--model-config", tiny, "--epochs", "1"]
  assert cli.main([*argv, "--electrostatics", "--split", "random", "--out", str(out)]) == 0
  assert potentials.load(out).config.electrostatics
  assert cli.main([*argv[:2], "--init", str(out), "--electrostatics", "--out", "x.eqm"]) == 2
  with pytest.raises(SystemExit) as bad:  # argparse: one line, exit 2, before any work
    cli.main([*argv, "--charge", "nan", "--out", str(tmp_path / "nan.eqm")])
  assert bad.value.code == 2 and not (tmp_path / "nan.eqm").exists()


def test_md_on_both_engines_and_replicas_with_charges_in_the_frames(tmp_path):
  """``eqattn md --charge``: both engines and a batch of replicas run a charged system,
  every frame carries charges that sum to the total, and all start from the same energy."""
  from ase.io import read, write

  from plugin import cli

  model = tmp_path / "m.eqm"
  tiny = dict(features=8, num_iterations=1, num_basis=6, cutoff=3.0, electrostatics=True)
  potentials.Potential.create(0, species=["Na", "Cl"], **tiny).save(model)
  start = tmp_path / "ion.xyz"
  write(start, dimer_pair(6.0)[2][:3])  # Na Cl Na
  common = ["md", str(start), "--model", str(model), "--steps", "4", "--charge", "1"]
  common += ["--dt", "0.5", "--traj-interval", "2"]
  first = {}
  for engine in ("ase", "jax-md"):
    out = tmp_path / f"{engine}.traj"
    assert cli.main([*common, "--engine", engine, "--out", str(out)]) == 0
    frames = read(out, ":")
    assert len(frames) == 3
    for f in frames:
      q = f.calc.results["charges"]
      assert q.shape == (3,) and q.sum() == pytest.approx(1.0, abs=1e-5)
    first[engine] = frames[0]
  assert first["jax-md"].get_potential_energy() == pytest.approx(
    first["ase"].get_potential_energy(), abs=1e-4
  )
  np.testing.assert_allclose(
    first["jax-md"].calc.results["charges"], first["ase"].calc.results["charges"], atol=1e-5
  )
  # a batch of replicas: each starts where the engines did, its charges in its frames (an
  # Ewald accuracy set at run time: nothing periodic here, so the same energies)
  fine = ["--ewald-accuracy", "1e-8"]
  assert cli.main([*common, *fine, "--replicas", "2", "--out", str(tmp_path / "b.traj")]) == 0
  assert cli.main([*common, "--ewald-accuracy", "2", "--out", str(tmp_path / "c.traj")]) == 2
  assert not (tmp_path / "c.traj").exists()
  for i in range(2):
    frames = read(tmp_path / f"b.{i}.traj", ":")
    assert frames[0].get_potential_energy() == pytest.approx(
      first["ase"].get_potential_energy(), abs=1e-4
    )
    assert [f.calc.results["charges"].sum() for f in frames] == pytest.approx([1.0] * 3, abs=1e-5)


def _sheared_salt():
  atoms = rattled_salt(3)
  cell = atoms.cell[:].copy()
  cell[1, 0] += 0.9
  atoms.set_cell(cell, scale_atoms=True)
  atoms.wrap()
  return atoms


# PME by default; open boundaries, a real-space Ewald cell and a triclinic one with -m slow
# (tests/test_electrostatics.py and tests/test_pme.py check those sums themselves)
@pytest.mark.parametrize(
  "case",
  [
    pytest.param("open-ion", marks=pytest.mark.slow),
    pytest.param("cubic-real", marks=pytest.mark.slow),
    pytest.param("triclinic-fractional", marks=pytest.mark.slow),
    "pme",
  ],
)
def test_jax_md_agrees_with_the_calculator(charged, case, monkeypatch):
  """JAX-MD energy, forces, stress, per-atom energies and virials and charges equal the ASE
  calculator's to float64 rounding: open (a charged Na Cl Na), a cubic cell in real
  coordinates on JAX-MD's own list, a small triclinic one in fractional coordinates (image
  list), and that cell again with PME instead of the Ewald sum on both sides."""
  from jax_md import quantity, space

  from plugin import jax_md as pj

  if case == "pme":  # PME wherever a cell is periodic (a grid for 1e-6, not 1e-10: small)
    monkeypatch.setattr(es, "MESH_COST", 0.0)
    charged, case = charged.with_ewald_accuracy(1e-6), "triclinic-fractional"

  charge = 1.0 if case == "open-ion" else 0.0
  if case == "open-ion":
    atoms = dimer_pair(4.0)[2][:3]
    atoms.info["charge"] = charge
  else:
    atoms = rattled_salt(2).repeat(2) if case == "cubic-real" else _sheared_salt()
    atoms.wrap()
  e_ase, atoms = energy(charged, atoms)
  box = jnp.asarray(atoms.cell[:].T if atoms.pbc.all() else 30.0 * np.eye(3))
  fractional = case == "triclinic-fractional"
  if case == "open-ion":
    displacement, _ = space.free()
  elif fractional:
    displacement, _ = space.periodic_general(box)
  else:
    displacement, _ = space.periodic(jnp.diag(box))
  kw = dict(atomic_numbers=atoms.numbers, fractional_coordinates=fractional, charge=charge)
  neighbor_fn, energy_fn = pj.neighbor_list(charged, displacement, box, **kw)
  atom_energy_fn = pj.neighbor_list(charged, displacement, box, per_particle=True, **kw)[1]
  R = jnp.asarray(atoms.get_scaled_positions() if fractional else atoms.positions)
  nbrs = neighbor_fn.allocate(R)
  assert isinstance(nbrs, pj.ImageNeighborList) == fractional
  e = float(energy_fn(R, nbrs))
  assert abs(e - e_ase) <= 1e-9 * abs(e_ase)
  f_ase = atoms.get_forces()
  f = -np.asarray(jax.grad(energy_fn)(R, nbrs))
  np.testing.assert_allclose(f, f_ase, rtol=0, atol=1e-9 * np.abs(f_ase).max())
  np.testing.assert_allclose(atom_energy_fn(R, nbrs), atoms.get_potential_energies(), atol=1e-9)
  q = np.asarray(pj.charge_fn(energy_fn)(R, nbrs))
  np.testing.assert_allclose(q, atoms.calc.results["charges"], atol=1e-12)
  assert q.sum() == pytest.approx(charge, abs=1e-12) and np.abs(q).max() > 1e-3
  w = np.asarray(pj.atom_virial_fn(energy_fn)(R, nbrs))
  if case == "open-ion":
    return
  s_ase = atoms.get_stress(voigt=False)
  s = -np.asarray(quantity.stress(energy_fn, R, box, neighbor=nbrs))  # jax-md sign: -ASE
  np.testing.assert_allclose(s, s_ase, rtol=0, atol=1e-9 * np.abs(s_ase).max())
  stresses = atoms.get_stresses()  # ASE's per-atom Voigt form of -W_i / V
  np.testing.assert_allclose(
    -w / atoms.get_volume(), full(stresses), rtol=0, atol=1e-9 * np.abs(stresses).max()
  )


def full(voigt):
  """ASE's Voigt ``(..., 6)`` as ``(..., 3, 3)``."""
  xx, yy, zz, yz, xz, xy = np.moveaxis(voigt, -1, 0)
  return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1),
                   np.stack([xz, yz, zz], -1)], -2)  # fmt: skip


@pytest.mark.slow  # two minutes with a cold cache; the default selection runs replicas with
# charges in test_md_on_both_engines_and_replicas_with_charges_in_the_frames
@pytest.mark.parametrize("mesh", [False, True], ids=["ewald", "pme"])
def test_a_batch_of_replicas_equals_each_run_alone(charged, mesh, monkeypatch):
  """NVE of a charged open ion and a periodic salt cell in one batch: each replica's energy,
  positions and charges equal its run alone (float64), with the Ewald sum and with PME."""
  from plugin import md

  if mesh:  # PME (to its 1e-6 accuracy: each run's frame sees a different grid offset)
    monkeypatch.setattr(es, "MESH_COST", 0.0)
    charged = charged.with_ewald_accuracy(1e-6)
  tol = dict(rel=1e-7) if mesh else dict(abs=1e-9)

  ion = dimer_pair(4.0)[2][:3]
  ion.info["charge"] = 1.0
  salt = rattled_salt(5)
  kw = dict(ensemble="nve", temperature=300, timestep=1.0, total_steps=6, chunk=3)
  kw.update(dtype="float64", seed=[0, 1])
  both = md.run([ion, salt], charged, **kw)
  for k, atoms in enumerate((ion, salt)):
    alone = md.run(atoms, charged, **{**kw, "seed": k})
    a, b = both[k].atoms, alone.atoms
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), **tol)
    atol = 1e-6 if mesh else 1e-9
    np.testing.assert_allclose(a.positions, b.positions, atol=atol)
    np.testing.assert_allclose(a.calc.results["charges"], b.calc.results["charges"], atol=atol)
