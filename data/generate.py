#!/usr/bin/env python
"""Generate the eqattn reference training datasets (offline, deterministic).

Usage
-----
    OMP_NUM_THREADS=1 python data/generate.py [ethanol|copper|all] [--out DIR] [--seed N]
    OMP_NUM_THREADS=1 python data/generate.py [ethanol|copper|all] --check-only

Writes (into ``--out``, default: the folder holding this script):

``ethanol.extxyz.gz``
    Ethanol (``ase.build.molecule('CH3CH2OH')``, 9 atoms, open boundaries, no cell) at the
    GFN2-xTB level (``tblite.ase.TBLite(method="GFN2-xTB", accuracy=0.01)``, default electronic
    temperature).  Frames are sampled from Langevin
    MD (0.5 fs step, friction 0.01/fs) at 300, 450 and 600 K: two independent trajectories per
    temperature, each equilibrated for 1 ps, then one frame every 50 steps (25 fs).
    ``config_type`` is ``md_<T>K``.

``copper.extxyz.gz``
    FCC copper with ASE's EMT calculator (lattice constant 3.59 Å, the EMT equilibrium), energies,
    forces and stress.  Langevin MD (2 fs step, friction 0.01/fs), one frame every 40 steps (80 fs)
    after equilibration; several independent runs per (kind, temperature), each tagged
    ``trajectory``.  ``config_type`` values:

    * ``bulk_md``      -- 2x2x2 cubic (32 atoms) and 3x3x3 primitive (27 atoms, triclinic)
                          cells at 300, 600, 900, 1200 K, 8 runs per T;
    * ``strain_iso``   -- isotropic strain, each cell scaled by 1+e, e ~ U(-5%, +5%);
    * ``strain_aniso`` -- independent diagonal strains e_xx, e_yy, e_zz ~ U(-5%, +5%);
    * ``shear``        -- symmetric off-diagonal strains e_yz, e_xz, e_xy ~ U(-5%, +5%);
                          (the three strained kinds: thermal rattling by short Langevin MD at a
                          temperature drawn from U(300, 900) K in the fixed strained cell;
                          cubic and primitive cells alternate; one run per cell);
    * ``vacancy``      -- 2x2x2 cubic cell with one atom removed (31 atoms), 300-1200 K, 6 runs
                          per T;
    * ``surface_111`` / ``surface_100`` -- 3x3x4-atom slabs (36 atoms) with a 15 Å vacuum gap
                          along z, **pbc=(True, True, True)** (periodic images across the gap do
                          not interact: the gap exceeds the EMT cutoff), at 300, 600, 900 K,
                          6 runs per T;
    * ``liquid``       -- 2x2x2 cubic cell with a 3 % larger lattice constant, melted at
                          3000 K for 2 ps, then at 1500 and 1800 K, 6 runs per T.

    Stress is the calculator's ``get_stress()`` (ASE convention ``(1/V) dE/d(strain)``, Voigt
    ``xx yy zz yz xz xy``, eV/Å^3), i.e. the potential (virial) part only, without the kinetic
    ideal-gas term.  Runs are independent jobs (``--jobs N`` processes); the file does not
    depend on N.

Every frame stores ``config_type``, ``temperature_K`` (thermostat target) and ``source`` in
``atoms.info``; energy (eV), forces (eV/Å) and, for copper, stress go through ASE's
``SinglePointCalculator``, so ``ase.io.read(path, ':')`` returns atoms whose
``get_potential_energy()``, ``get_forces()`` and ``get_stress()`` give the reference values.
Velocities are not stored.

Determinism: all randomness comes from ``numpy.random.default_rng([seed, stream])``; the gzip
header carries no timestamp or file name, so rerunning with the same seed and the same library
versions on one thread gives byte-identical files.  Run with ``OMP_NUM_THREADS=1`` (the script
sets it itself if unset, before tblite is imported).

After writing, the script reads each file back and checks it (frame counts, species, no NaN,
stored values reproduced by a fresh calculator, forces and copper stress against central finite
differences on two frames).  ``--check-only`` runs only these checks on existing files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import time
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.build import bulk, fcc100, fcc111, molecule  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.constraints import FixCom  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import (  # noqa: E402
  MaxwellBoltzmannDistribution,
  Stationary,
  ZeroRotation,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ETHANOL_FILE = "ethanol.extxyz.gz"
COPPER_FILE = "copper.extxyz.gz"

# --------------------------------------------------------------------------------------------
# ethanol settings
ETH_TEMPS = (300.0, 450.0, 600.0, 800.0)
ETH_TRAJ_PER_T = 4  # whole trajectories can be held out: 2 train, 1 valid, 1 test per T
ETH_FRAMES_PER_TRAJ = 200  # 4 * 4 * 200 = 3200 frames (5 ps per trajectory)
ETH_DT_FS = 0.5
ETH_EQUIL_STEPS = 2000  # 1 ps
ETH_INTERVAL = 50  # 25 fs between frames
ETH_SOURCE = "GFN2-xTB/tblite"
ETH_ACCURACY = 0.01  # tblite SCC accuracy (default 1.0; smaller is tighter)

# copper settings: several independent runs per (kind, T), so that whole runs can be held
# out while every temperature of every kind stays in training
CU_A = 3.59  # EMT equilibrium lattice constant (zero pressure at 0 K)
CU_DT_FS = 2.0
CU_INTERVAL = 40  # 80 fs between frames
CU_EQUIL_STEPS = 500  # 1 ps
CU_STRAIN_EQUIL_STEPS = 200  # 0.4 ps, for the many short strained-cell runs
CU_BULK_TEMPS = (300.0, 600.0, 900.0, 1200.0)
CU_BULK_RUNS = 8  # per T, cubic and primitive cells alternating
CU_BULK_FRAMES = 15  # per run: 4 T * 8 * 15 = 480
CU_STRAIN_CELLS = 30  # per strain kind, 4 frames each: 3 * 30 * 4 = 360
CU_STRAIN_FRAMES = 4
CU_STRAIN_MAX = 0.05
CU_VAC_TEMPS = (300.0, 600.0, 900.0, 1200.0)
CU_VAC_RUNS = 6
CU_VAC_FRAMES = 10  # 4 * 6 * 10 = 240
CU_SURF_TEMPS = (300.0, 600.0, 900.0)
CU_SURF_RUNS = 6
CU_SURF_FRAMES = 10  # 2 facets * 3 T * 6 * 10 = 360
CU_VACUUM = 7.5  # on each side -> 15 Angstrom gap
CU_LIQ_TEMPS = (1500.0, 1800.0)
CU_LIQ_RUNS = 6
CU_LIQ_FRAMES = 20  # 2 * 6 * 20 = 240
CU_LIQ_EXPANSION = 1.03  # lattice constant factor: ~9 % more volume, near liquid Cu's density
CU_MELT_T = 3000.0  # the crystal is first melted here for CU_MELT_STEPS
CU_MELT_STEPS = 1000  # 2 ps
CU_SOURCE = "EMT/ase"
# kinds sampled at fixed temperatures: (temperatures, runs per T, frames per run)
CU_THERMAL_KINDS = {
  "bulk_md": (CU_BULK_TEMPS, CU_BULK_RUNS, CU_BULK_FRAMES),
  "vacancy": (CU_VAC_TEMPS, CU_VAC_RUNS, CU_VAC_FRAMES),
  "surface_111": (CU_SURF_TEMPS, CU_SURF_RUNS, CU_SURF_FRAMES),
  "surface_100": (CU_SURF_TEMPS, CU_SURF_RUNS, CU_SURF_FRAMES),
  "liquid": (CU_LIQ_TEMPS, CU_LIQ_RUNS, CU_LIQ_FRAMES),
}
FRICTION = 0.01 / units.fs
KINETIC_T: dict = {}  # config_type -> [(target T, instantaneous T)] at sampled frames


def log(msg: str) -> None:
  print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# helpers


def snapshot(atoms: Atoms, info: dict, stress: bool) -> Atoms:
  """A clean copy of ``atoms`` (no velocities/constraints) with the calculator's results."""
  # raw calculator results: the FixCom constraint used during MD must not alter them
  energy = float(atoms.get_potential_energy())
  forces = np.array(atoms.get_forces(apply_constraint=False), dtype=float)
  results = {"energy": energy, "forces": forces}
  if stress:
    results["stress"] = np.array(atoms.get_stress(voigt=True, apply_constraint=False), dtype=float)
  frame = Atoms(
    numbers=atoms.get_atomic_numbers(),
    positions=atoms.get_positions(),
    cell=atoms.get_cell(),
    pbc=atoms.get_pbc(),
  )
  frame.info.update(info)
  frame.calc = SinglePointCalculator(frame, **results)
  for key, value in results.items():
    if not np.all(np.isfinite(value)):
      raise RuntimeError(f"non-finite {key} in frame {info}")
  return frame


def run_langevin(
  atoms,
  calc,
  temperature_K,
  dt_fs,
  equil_steps,
  interval,
  n_frames,
  rng,
  info,
  stress,
  molecule_=False,
):
  """Langevin MD from Maxwell-Boltzmann velocities; returns ``n_frames`` snapshots.

  The centre of mass is held fixed with ``FixCom`` (ASE's recommended replacement for the
  deprecated ``Langevin(fixcm=True)``).
  """
  atoms.calc = calc
  MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
  Stationary(atoms)
  if molecule_:
    ZeroRotation(atoms)
  atoms.set_constraint(FixCom())
  dyn = Langevin(
    atoms, dt_fs * units.fs, temperature_K=temperature_K, friction=FRICTION, fixcm=False, rng=rng
  )
  dyn.run(equil_steps)
  frames = []
  kinetic = KINETIC_T.setdefault(info["config_type"], [])
  for _ in range(n_frames):
    dyn.run(interval)
    kinetic.append((temperature_K, atoms.get_temperature()))
    frames.append(snapshot(atoms, dict(info, temperature_K=float(temperature_K)), stress))
  return frames


def log_kinetic_temperatures() -> None:
  """Sanity check of the thermostat: mean instantaneous T / target T per config_type."""
  for key, pairs in KINETIC_T.items():
    ratio = np.array([t / t0 for t0, t in pairs])
    log(
      f"  {key}: <T_kin/T_target> = {ratio.mean():.3f} (std {ratio.std():.3f}, {len(ratio)} frames)"
    )
  KINETIC_T.clear()


def write_frames(frames, path: str) -> None:
  """Write gzip-compressed extxyz deterministically (no mtime/name in the gzip header)."""
  import ase.io

  tmp = path + ".tmp"
  with open(tmp, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
      with io.TextIOWrapper(gz, encoding="ascii", newline="\n") as text:
        ase.io.write(text, frames, format="extxyz")
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# ethanol


def ethanol_calc():
  from tblite.ase import TBLite

  # accuracy=0.01 tightens the SCC convergence 100x over the default (1.0): forces then agree
  # with a cold-started calculation to ~1e-6 eV/A instead of ~1e-4 eV/A, for ~20% more time.
  return TBLite(method="GFN2-xTB", verbosity=0, accuracy=ETH_ACCURACY)


def generate_ethanol(out_dir: str, seed: int) -> str:
  frames = []
  stream = 0
  for temp in ETH_TEMPS:
    for traj in range(ETH_TRAJ_PER_T):
      t0 = time.time()
      rng = np.random.default_rng([seed, 1, stream])
      stream += 1
      atoms = molecule("CH3CH2OH")
      info = {
        "config_type": f"md_{int(temp)}K",
        "source": ETH_SOURCE,
        "trajectory": f"md_{int(temp)}K/{traj}",
      }
      new = run_langevin(
        atoms,
        ethanol_calc(),
        temp,
        ETH_DT_FS,
        ETH_EQUIL_STEPS,
        ETH_INTERVAL,
        ETH_FRAMES_PER_TRAJ,
        rng,
        info,
        stress=False,
        molecule_=True,
      )
      frames += new
      log(f"  ethanol T={temp:.0f} K traj {traj}: {len(new)} frames ({time.time() - t0:.1f} s)")
  log_kinetic_temperatures()
  path = os.path.join(out_dir, ETHANOL_FILE)
  write_frames(frames, path)
  log(f"wrote {path}: {len(frames)} frames, {os.path.getsize(path) / 1e6:.2f} MB")
  return path


# --------------------------------------------------------------------------------------------
# copper


def copper_calc():
  from ase.calculators.emt import EMT

  return EMT()


def cu_cell(kind: str, scale: float = 1.0) -> Atoms:
  if kind == "cubic222":
    return bulk("Cu", "fcc", a=CU_A * scale, cubic=True) * (2, 2, 2)
  if kind == "prim333":
    return bulk("Cu", "fcc", a=CU_A * scale) * (3, 3, 3)
  raise ValueError(kind)


def cu_slab(facet: str) -> Atoms:
  build = {"111": fcc111, "100": fcc100}[facet]
  slab = build("Cu", size=(3, 3, 4), a=CU_A, vacuum=CU_VACUUM)
  slab.pbc = (True, True, True)  # vacuum gap along z; fully periodic
  return slab


def random_strain(kind: str, rng) -> np.ndarray:
  eps = np.zeros((3, 3))
  if kind == "strain_iso":
    eps += np.eye(3) * rng.uniform(-CU_STRAIN_MAX, CU_STRAIN_MAX)
  elif kind == "strain_aniso":
    eps += np.diag(rng.uniform(-CU_STRAIN_MAX, CU_STRAIN_MAX, size=3))
  elif kind == "shear":
    yz, xz, xy = rng.uniform(-CU_STRAIN_MAX, CU_STRAIN_MAX, size=3)
    eps = np.array([[0.0, xy, xz], [xy, 0.0, yz], [xz, yz, 0.0]])
  else:
    raise ValueError(kind)
  return eps


def copper_runs():
  """Every copper MD run as ``(kind, temperature or None, run index)``, in file order."""
  runs = [
    (kind, t, k)
    for kind, (temps, n, _) in CU_THERMAL_KINDS.items()
    for t in temps
    for k in range(n)
  ]
  for kind in ("strain_iso", "strain_aniso", "shear"):
    runs += [(kind, None, k) for k in range(CU_STRAIN_CELLS)]
  return runs


def copper_run(job):
  """One copper run: ``(frames, kinetic samples)``. ``job = (seed, stream, kind, T, k)``;
  its random stream depends on nothing else, so runs can go to any process."""
  seed, stream, kind, temp, k = job
  rng = np.random.default_rng([seed, 2, stream])
  equil, n_frames = CU_EQUIL_STEPS, CU_THERMAL_KINDS.get(kind, (None, None, None))[2]
  if kind == "bulk_md":
    atoms = cu_cell("cubic222" if k % 2 == 0 else "prim333")
  elif kind == "vacancy":
    atoms = cu_cell("cubic222")
    del atoms[0]
  elif kind.startswith("surface_"):
    atoms = cu_slab(kind.split("_")[1])
  elif kind == "liquid":
    atoms = cu_cell("cubic222", CU_LIQ_EXPANSION)
    run_langevin(
      atoms,
      copper_calc(),
      CU_MELT_T,
      CU_DT_FS,
      CU_MELT_STEPS,
      1,
      0,
      rng,
      {"config_type": "melt"},
      False,
    )
  else:  # strained cells: one short run per random strain, at a random temperature
    atoms = cu_cell("cubic222" if k % 2 == 0 else "prim333")
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + random_strain(kind, rng)), scale_atoms=True)
    temp = float(np.round(rng.uniform(300.0, 900.0), 1))
    equil, n_frames = CU_STRAIN_EQUIL_STEPS, CU_STRAIN_FRAMES
  label = f"{kind}/{k}" if kind.startswith(("strain", "shear")) else f"{kind}_{int(temp)}K/{k}"
  info = {"config_type": kind, "source": CU_SOURCE, "trajectory": label}
  frames = run_langevin(
    atoms, copper_calc(), temp, CU_DT_FS, equil, CU_INTERVAL, n_frames, rng, info, stress=True
  )
  kinetic = {kind: KINETIC_T.pop(kind, [])}
  KINETIC_T.clear()
  return frames, kinetic


def generate_copper(out_dir: str, seed: int, processes: int = 1) -> str:
  import multiprocessing

  jobs = [(seed, i, *run) for i, run in enumerate(copper_runs())]
  t0 = time.time()
  with multiprocessing.get_context("spawn").Pool(processes) as pool:
    results = pool.map(copper_run, jobs, chunksize=1)
  frames = []
  for new, kinetic in results:
    frames += new
    for key, pairs in kinetic.items():
      KINETIC_T.setdefault(key, []).extend(pairs)
  log(f"  copper: {len(jobs)} runs in {time.time() - t0:.1f} s on {processes} processes")
  log_kinetic_temperatures()
  path = os.path.join(out_dir, COPPER_FILE)
  write_frames(frames, path)
  log(f"wrote {path}: {len(frames)} frames, {os.path.getsize(path) / 1e6:.2f} MB")
  return path


# --------------------------------------------------------------------------------------------
# checks


def _fd_forces(atoms, calc_factory, pairs, h):
  out = []
  for a, c in pairs:
    e = []
    for sign in (+1, -1):
      trial = atoms.copy()
      trial.calc = calc_factory()
      trial.positions[a, c] += sign * h
      e.append(trial.get_potential_energy())
    out.append(-(e[0] - e[1]) / (2 * h))
  return np.array(out)


def _fd_stress(atoms, calc_factory, h):
  """Central differences of E under symmetric strain, ASE convention, Voigt order."""
  vol = atoms.get_volume()
  comps = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
  out = []
  for i, j in comps:
    e = []
    for sign in (+1, -1):
      eps = np.zeros((3, 3))
      eps[i, j] += sign * h / (1 if i == j else 2)
      if i != j:
        eps[j, i] += sign * h / 2
      trial = atoms.copy()
      trial.calc = calc_factory()
      trial.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
      e.append(trial.get_potential_energy())
    out.append((e[0] - e[1]) / (2 * h) / vol)
  return np.array(out)


def check_file(path: str, calc_factory, expect_species, expect_stress: bool, seed: int = 0):
  import ase.io

  frames = ase.io.read(path, ":")
  counts = Counter(f.info["config_type"] for f in frames)
  species = sorted(set(s for f in frames for s in f.get_chemical_symbols()))
  assert species == sorted(expect_species), species
  energies = np.array([f.get_potential_energy() for f in frames])
  epa = np.array([f.get_potential_energy() / len(f) for f in frames])
  fmax = np.array([np.abs(f.get_forces()).max() for f in frames])
  for f in frames:
    assert np.all(np.isfinite(f.positions))
    assert np.all(np.isfinite(f.get_forces()))
    assert np.isfinite(f.get_potential_energy())
    assert "temperature_K" in f.info and "source" in f.info
    assert "trajectory" in f.info  # held-out trajectories
  log(
    f"{os.path.basename(path)}: {len(frames)} frames, {os.path.getsize(path) / 1e6:.2f} MB, "
    f"species {species}"
  )
  for key in sorted(counts):
    sel = [i for i, f in enumerate(frames) if f.info["config_type"] == key]
    natoms = sorted(set(len(frames[i]) for i in sel))
    temps = sorted(set(float(frames[i].info["temperature_K"]) for i in sel))
    trange = (
      f"{temps[0]:.0f}-{temps[-1]:.0f} K"
      if len(temps) > 3
      else ", ".join(f"{t:.0f}" for t in temps) + " K"
    )
    log(
      f"  {key:13s} {counts[key]:5d} frames, natoms {natoms}, T {trange}, "
      f"E/atom [{epa[sel].min():.4f}, {epa[sel].max():.4f}] eV, "
      f"max|F| {fmax[sel].max():.3f} eV/A"
    )
  log(
    f"  energy range [{energies.min():.4f}, {energies.max():.4f}] eV; "
    f"|F| component max {fmax.max():.3f} eV/A, mean max-per-frame {fmax.mean():.3f}"
  )
  if expect_stress:
    stress = np.array([f.get_stress() for f in frames])
    assert np.all(np.isfinite(stress))
    log(
      f"  stress range [{stress.min():.4f}, {stress.max():.4f}] eV/A^3 "
      f"([{stress.min() / units.GPa:.2f}, {stress.max() / units.GPa:.2f}] GPa)"
    )
  else:
    assert all(not f.pbc.any() and f.cell.rank == 0 for f in frames)

  # recompute + finite differences on two frames
  rng = np.random.default_rng([seed, 99])
  picks = [0, int(rng.integers(1, len(frames)))]
  worst = {"energy": 0.0, "forces_ref": 0.0, "forces_fd": 0.0, "stress_ref": 0.0, "stress_fd": 0.0}
  for idx in picks:
    ref = frames[idx]
    atoms = ref.copy()
    atoms.calc = calc_factory()
    worst["energy"] = max(
      worst["energy"], abs(atoms.get_potential_energy() - ref.get_potential_energy())
    )
    worst["forces_ref"] = max(
      worst["forces_ref"], np.abs(atoms.get_forces() - ref.get_forces()).max()
    )
    pairs = [(int(a), int(c)) for a, c in zip(rng.integers(0, len(ref), 6), rng.integers(0, 3, 6))]
    fd = _fd_forces(ref, calc_factory, pairs, h=1e-3)
    an = np.array([ref.get_forces()[a, c] for a, c in pairs])
    worst["forces_fd"] = max(worst["forces_fd"], np.abs(fd - an).max())
    if expect_stress:
      worst["stress_ref"] = max(
        worst["stress_ref"], np.abs(atoms.get_stress() - ref.get_stress()).max()
      )
      worst["stress_fd"] = max(
        worst["stress_fd"], np.abs(_fd_stress(ref, calc_factory, 1e-4) - ref.get_stress()).max()
      )
  log(
    f"  frames {picks}: |dE| recomputed {worst['energy']:.2e} eV, |dF| recomputed "
    f"{worst['forces_ref']:.2e}, |F - FD| {worst['forces_fd']:.2e} eV/A"
    + (
      f", |dS| recomputed {worst['stress_ref']:.2e}, |S - FD| {worst['stress_fd']:.2e} eV/A^3"
      if expect_stress
      else ""
    )
  )
  assert worst["energy"] < 1e-4, worst
  assert worst["forces_ref"] < 1e-4, worst
  assert worst["forces_fd"] < 5e-3, worst
  if expect_stress:
    assert worst["stress_ref"] < 1e-6 and worst["stress_fd"] < 1e-5, worst
  return counts


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("which", nargs="?", default="all", choices=("ethanol", "copper", "all"))
  parser.add_argument("--out", default=HERE, help="output folder (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=20240601, help="random seed")
  parser.add_argument("--jobs", type=int, default=1, help="processes for the copper runs")
  parser.add_argument(
    "--check-only", action="store_true", help="only read back and check existing files"
  )
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  jobs = []
  if args.which in ("ethanol", "all"):
    jobs.append((generate_ethanol, ETHANOL_FILE, ethanol_calc, ["C", "H", "O"], False))
  if args.which in ("copper", "all"):
    jobs.append((generate_copper, COPPER_FILE, copper_calc, ["Cu"], True))

  for gen, name, calc_factory, species, stress in jobs:
    t0 = time.time()
    if not args.check_only:
      log(f"generating {name} (seed {args.seed}) ...")
      gen(args.out, args.seed, *([args.jobs] if gen is generate_copper else []))
      log(f"  generation time {time.time() - t0:.1f} s")
    t1 = time.time()
    check_file(os.path.join(args.out, name), calc_factory, species, stress, args.seed)
    log(f"  check time {time.time() - t1:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
