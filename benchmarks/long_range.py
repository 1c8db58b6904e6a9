"""Beyond the cutoff: the same architecture with and without learnt-charge electrostatics.

Reference: GFN2-xTB (tblite, ``pip install '.[data]'``). Three pairs of molecules: water-water,
water-methanol (polar) and ammonium-water (charged, +1). The training pool (``make``): monomer
MD frames and dimers of MD monomers in random orientations at centre distances of 2.6-12 Å,
labelled with energies and forces (each dimer ``info["charge"]`` set). Held out: binding
curves of orientations and monomer geometries no training frame used (a separate MD run), at
centre distances 3-12 Å; the interaction energy ``E(AB) - E(A) - E(B)`` of the reference and
of each model is compared, apart for the points with no intermolecular atom pair within the
model's cutoff ("beyond the cutoff": a local model gives exactly 0 there) and the others::

    python benchmarks/long_range.py --out out/long_range --make
    python benchmarks/long_range.py --out out/long_range --minutes 10 --jobs 2
    python benchmarks/long_range.py --out out/long_range --report
    python benchmarks/long_range.py --out out/long_range --cost    # E+F call with and without
    python benchmarks/long_range.py --out out/long_range --drift   # NVE, float32, both engines
    python benchmarks/long_range.py --out out/long_range --drift --mesh   # the same with PME
    python benchmarks/long_range.py --out out/long_range --reciprocal     # PME against vectors

``--jobs 2`` trains the two models side by side, each pinned to its own core, each for
``--minutes`` of wall time (``potentials.training.train`` with ``time_limit``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPECIES = ["H", "C", "N", "O"]
PAIRS = {"water-water": ("H2O", "H2O", 0), "water-methanol": ("H2O", "CH3OH", 0)}
PAIRS["ammonium-water"] = ("NH4+", "H2O", 1)
MODELS = {"local": {}, "electrostatics": {"electrostatics": True}}
# charges moved along pairs (ModelConfig.charge_transfer): ``--models local,transfer``
VARIANTS = {**MODELS, "transfer": {"electrostatics": True, "charge_transfer": True}}
MIN_CONTACT = 1.6  # Å: closest intermolecular atoms in a dimer


def molecule(name: str):
  """An ASE molecule (with its charge in ``info``); NH4+ built as a tetrahedron."""
  import ase
  import ase.build

  if name == "NH4+":
    h = np.array([[1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]]) * (1.03 / np.sqrt(3))
    atoms = ase.Atoms("NH4", positions=np.vstack([[0, 0, 0], h]))
    atoms.info["charge"] = 1.0
    return atoms
  atoms = ase.build.molecule(name)
  atoms.info["charge"] = 0.0
  return atoms


def reference(charge: float):
  from tblite.ase import TBLite

  return TBLite(method="GFN2-xTB", charge=charge, verbosity=0, accuracy=0.01)


def label(atoms):
  """``atoms`` with GFN2-xTB energy and forces attached (single point)."""
  from ase.calculators.singlepoint import SinglePointCalculator

  a = atoms.copy()
  a.calc = reference(a.info.get("charge", 0.0))
  e, f = a.get_potential_energy(), a.get_forces()
  a.calc = SinglePointCalculator(a, energy=e, forces=f)
  return a


def monomer_md(name: str, frames: int, seed: int, temperature=400.0):
  """``frames`` geometries of a monomer from GFN2-xTB Langevin MD, 20 fs apart."""
  from ase import units
  from ase.md.langevin import Langevin
  from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

  atoms = molecule(name)
  atoms.calc = reference(atoms.info["charge"])
  rng = np.random.default_rng(seed)
  MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
  dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
  dyn.run(200)
  out = []
  for _ in range(frames):
    dyn.run(40)
    a = atoms.copy()
    a.info = dict(atoms.info)
    out.append(a)
  return out


def random_rotation(rng):
  """A Haar-random rotation drawn from ``rng`` (``potentials.so3.random_rotation``)."""
  from potentials import so3

  return so3.random_rotation(int(rng.integers(2**31)))


def dimer(a, b, rot_a, rot_b, direction, distance):
  """Monomers ``a`` and ``b`` turned and their centres of mass ``distance`` Å apart."""
  pa = (a.positions - a.get_center_of_mass()) @ rot_a.T
  pb = (b.positions - b.get_center_of_mass()) @ rot_b.T + distance * direction
  both = a.copy() + b.copy()
  both.positions = np.vstack([pa, pb])
  both.info = {"charge": a.info["charge"] + b.info["charge"]}
  return both, float(np.min(np.linalg.norm(pa[:, None] - pb[None], axis=-1)))


def make(out: Path, seed: int = 0) -> None:
  """The training pool (``pool.extxyz``) and the held-out curves (``curves.json``)."""
  from ase.io import write

  rng = np.random.default_rng(seed)
  names = sorted({m for a, b, _ in PAIRS.values() for m in (a, b)})
  train = {n: monomer_md(n, 60, seed + k) for k, n in enumerate(names)}
  held = {n: monomer_md(n, 8, seed + 100 + k) for k, n in enumerate(names)}
  pool = []
  for n, frames in train.items():
    for k, a in enumerate(frames[:30]):
      a = label(a)
      a.info.update(trajectory=f"{n}-{k // 10}", config_type=f"monomer {n}")
      pool.append(a)
  for pair, (na, nb, _) in PAIRS.items():
    made = 0
    while made < 400:
      a, b = train[na][rng.integers(60)], train[nb][rng.integers(60)]
      direction = rng.standard_normal(3)
      distance = 2.6 + 9.4 * rng.random() ** 1.5  # more of them near contact
      d, closest = dimer(
        a,
        b,
        random_rotation(rng),
        random_rotation(rng),
        direction / np.linalg.norm(direction),
        distance,
      )
      if closest < MIN_CONTACT:
        continue
      d = label(d)
      d.info.update(trajectory=f"{pair}-{made // 40}", config_type=pair)
      pool.append(d)
      made += 1
  write(out / "pool.extxyz", pool)
  curves = []
  for pair, (na, nb, _) in PAIRS.items():
    for k in range(6):
      a, b = held[na][k], held[nb][k]
      rot_a, rot_b = random_rotation(rng), random_rotation(rng)
      direction = rng.standard_normal(3)
      direction /= np.linalg.norm(direction)
      ea, eb = label(a).get_potential_energy(), label(b).get_potential_energy()
      points = []
      for distance in np.arange(3.0, 12.01, 0.5):
        d, closest = dimer(a, b, rot_a, rot_b, direction, distance)
        if closest < MIN_CONTACT:
          continue
        e = label(d).get_potential_energy()
        points.append(
          {
            "distance": float(distance),
            "closest": closest,
            "positions": d.positions.tolist(),
            "interaction": e - ea - eb,
          }
        )
      curves.append(
        {
          "pair": pair,
          "numbers": (a + b).numbers.tolist(),
          "split": len(a),
          "charges": [a.info["charge"], b.info["charge"]],
          "points": points,
        }
      )
  (out / "curves.json").write_text(json.dumps(curves))


def train_one(out: Path, name: str, minutes: float) -> None:
  t0 = time.perf_counter()
  import potentials
  from plugin.data import read_frames
  from potentials import training

  pot = potentials.Potential.create(0, species=SPECIES, **VARIANTS[name])
  frames = read_frames(str(out / "pool.extxyz"), pot.cutoff)
  cfg = training.TrainConfig(time_limit=minutes)
  res = training.train(pot, frames, cfg, progress=False, started=t0)
  res.potential.save(out / f"{name}.eqm")
  meta = res.potential.metadata["training"]
  row = {
    "model": name,
    "minutes": minutes,
    "epochs": meta["epochs_run"],
    "test": res.metrics["test"],
    "wall_s": round(time.perf_counter() - t0, 1),
  }
  row.update(curve_errors(out, res.potential))
  (out / f"{name}.json").write_text(json.dumps(row, indent=1))


def curve_errors(out: Path, potential) -> dict:
  """Interaction-energy errors (meV) on the held-out curves, beyond and within the cutoff."""
  import ase

  from plugin.ase import Calculator

  calc = Calculator(potential)
  curves = json.loads((out / "curves.json").read_text())
  beyond, within, by_pair = [], [], {}
  for c in curves:
    split, numbers = c["split"], np.asarray(c["numbers"])
    for p in c["points"]:
      pos = np.asarray(p["positions"])
      parts = []
      for sel, q in (
        (slice(None), sum(c["charges"])),
        (slice(0, split), c["charges"][0]),
        (slice(split, None), c["charges"][1]),
      ):
        atoms = ase.Atoms(numbers[sel], positions=pos[sel])
        atoms.info["charge"] = q
        atoms.calc = calc
        parts.append(atoms.get_potential_energy())
      err = abs(parts[0] - parts[1] - parts[2] - p["interaction"]) * 1e3
      (beyond if p["closest"] > potential.cutoff else within).append(err)
      by_pair.setdefault(c["pair"], []).append((p["closest"] > potential.cutoff, err))
  pairs = {
    k: {
      "beyond": float(np.mean([e for b, e in v if b] or [np.nan])),
      "within": float(np.mean([e for b, e in v if not b] or [np.nan])),
    }
    for k, v in by_pair.items()
  }
  return {
    "beyond_mae_meV": float(np.mean(beyond)),
    "within_mae_meV": float(np.mean(within)),
    "points": [len(beyond), len(within)],
    "pairs": pairs,
  }


def cost(out: Path, sizes=(96, 3000), repeats: int = 5) -> None:
  """Seconds of one energy+forces call (ASE calculator, float32, compiled) of the default
  model with and without electrostatics, on water boxes (periodic) and the same atoms as an
  open cluster; written to ``cost.json``."""
  import potentials
  from plugin.ase import Calculator

  rows = []
  for n in sizes:
    atoms = water_box(max(1, round((n / 3) ** (1 / 3))))
    for periodic in (True, False):
      a = atoms.copy()
      a.pbc = periodic
      for name, options in MODELS.items():
        pot = potentials.Potential.create(0, species=SPECIES, **options)
        a.calc = Calculator(pot)
        a.get_forces()  # compiles
        times = []
        for _ in range(repeats):
          a.positions += 1e-4
          t0 = time.perf_counter()
          a.get_forces()
          times.append(time.perf_counter() - t0)
        rows.append(
          {"atoms": len(a), "periodic": periodic, "model": name, "seconds": float(np.median(times))}
        )
        print(rows[-1], flush=True)
  (out / "cost.json").write_text(json.dumps(rows, indent=1))


def reciprocal(out: Path, sizes=(24, 96, 375, 1000, 3000), repeats: int = 5) -> None:
  """Seconds of the reciprocal part alone (energy and forces, float32, compiled) by the sum
  over reciprocal vectors and by PME, random neutral charges at water's atom density in cubic
  cells, the default cutoff and accuracy; written to ``reciprocal.json``."""
  import jax
  import jax.numpy as jnp

  from potentials import electrostatics as es
  from potentials import model, pme

  cutoff, accuracy = model.ModelConfig().cutoff, model.ModelConfig().ewald_accuracy
  alpha = es.alpha_for(cutoff, accuracy)
  rng = np.random.default_rng(0)
  rows = []
  for n in sizes:
    cell = np.eye(3) * (n / 0.1) ** (1 / 3)  # 0.1 atoms per Å^3
    x = jnp.asarray(rng.uniform(0, cell[0, 0], (n, 3)), jnp.float32)
    q = rng.standard_normal(n)
    q = jnp.asarray(q - q.mean(), jnp.float32)
    kvectors = es.kvectors_of(cell, cutoff, accuracy)
    shape = pme.mesh_shape(cell, alpha, accuracy)
    ways = {
      "vectors": es.one_system(
        np.ones(n, bool), 0.0, True, kvectors, np.ones(len(kvectors), bool), jnp.float32
      ),
      "pme": es.one_system(
        np.ones(n, bool), 0.0, True, kvectors[:0], np.ones(0, bool), jnp.float32, pme.moduli(shape)
      ),
    }
    row = {"atoms": n, "kvectors": len(kvectors), "grid": list(shape)}
    for name, frames in ways.items():
      cells = jnp.asarray(cell, jnp.float32)[None]

      def energy(x, frames=frames, cells=cells):
        return jnp.sum(q * es.reciprocal_potentials(x, q, cells, frames, alpha=alpha))

      fn = jax.jit(jax.value_and_grad(energy))
      jax.block_until_ready(fn(x))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
      row[f"{name}_seconds"] = float(np.median(times))
    rows.append(row)
    print(rows[-1], flush=True)
  (out / "reciprocal.json").write_text(json.dumps(rows, indent=1))


def water_box(k: int, spacing: float = 3.1, seed: int = 0):
  """``k^3`` randomly oriented water molecules on a cubic grid (~1 g/cm^3 at 3.1 Å), in a
  periodic cubic cell."""
  import ase
  import ase.build

  one = ase.build.molecule("H2O")
  grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3) * spacing
  atoms = ase.Atoms()
  rng = np.random.default_rng(seed)
  for g in grid:
    w = one.copy()
    w.rotate(rng.uniform(0, 360), rng.standard_normal(3))
    w.translate(g + 1.0)
    atoms += w
  atoms.cell, atoms.pbc = np.eye(3) * spacing * k, True
  return atoms


def drift(out: Path, ps: float = 2.0, mesh: bool = False) -> None:
  """NVE energy drift in float32 of the trained models (``--minutes`` runs) on both engines:
  8 water molecules 6 Å apart in a periodic 12 Å box (Ewald; dense water is outside the
  dimer pool these models learnt, and the local one runs away there) and the same molecules
  as an open cluster, 300 K, 0.5 fs, ``ps`` picoseconds (the first 0.2 discarded); written to
  ``drift.json``. ``mesh``: the model with electrostatics in the box only, its reciprocal
  part by PME instead of the vector sum (``drift_pme.json``)."""
  import potentials
  from plugin import testing
  from potentials import electrostatics

  if mesh:
    electrostatics.MESH_COST = 0.0  # PME wherever a cell is periodic
  rows = []
  for name in ["electrostatics"] if mesh else MODELS:
    pot = potentials.load(out / f"{name}.eqm")
    for periodic in (True,) if mesh else (True, False):
      atoms = water_box(2, spacing=6.0)
      atoms.pbc = periodic
      for engine in ("ase", "jax-md"):
        t0 = time.perf_counter()
        rep = testing.check_energy_conservation(
          atoms,
          temperature=300.0,
          timestep=0.5,
          duration=ps,
          warmup=0.2,
          **testing.engine_kwargs(engine, pot, atoms, "float32"),
        )
        rows.append(
          {
            "model": name,
            "periodic": periodic,
            "engine": engine,
            "atoms": len(atoms),
            "ps": ps,
            "drift_meV_atom_ps": rep.drift,
            "drift_error_meV_atom_ps": rep.drift_error,
            "fluctuation_meV_atom": rep.fluctuation,
            "mean_temperature_K": rep.mean_temperature,
            "reciprocal": "pme" if mesh else "vectors",
            "seconds": round(time.perf_counter() - t0, 1),
          }
        )
        print(rows[-1], flush=True)
  (out / ("drift_pme.json" if mesh else "drift.json")).write_text(json.dumps(rows, indent=1))


def report(out: Path) -> None:
  rows = {
    n: json.loads((out / f"{n}.json").read_text()) for n in VARIANTS if (out / f"{n}.json").exists()
  }
  print(
    "| model | epochs | held-out frames F MAE (meV/Å) | E_int MAE beyond cutoff (meV) "
    "| within (meV) | beyond, per pair |"
  )
  print("|---|---:|---:|---:|---:|---|")
  for n, r in rows.items():
    per = ", ".join(f"{k} {v['beyond']:.2f}" for k, v in r["pairs"].items())
    print(
      f"| {n} | {r['epochs']} | {1e3 * r['test']['forces_mae']:.1f} | {r['beyond_mae_meV']:.2f} "
      f"| {r['within_mae_meV']:.2f} | {per} |"
    )
  for n in rows.keys() - {"local"}:
    if "local" not in rows:
      break
    b = rows[n]["beyond_mae_meV"] / rows["local"]["beyond_mae_meV"]
    w = rows[n]["within_mae_meV"] / rows["local"]["within_mae_meV"]
    print(
      f"\nratio {n} / local: beyond the cutoff {b:.2f} (target <= 0.3), within {w:.2f} (<= 1.1)"
    )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="out/long_range")
  ap.add_argument("--make", action="store_true", help="make the pool and the curves")
  ap.add_argument("--minutes", type=float, default=10.0)
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--models", default="local,electrostatics", help=f"of {sorted(VARIANTS)}")
  ap.add_argument("--report", action="store_true")
  ap.add_argument("--cost", action="store_true", help="time E+F calls with and without")
  ap.add_argument("--drift", action="store_true", help="NVE drift (float32) on both engines")
  ap.add_argument("--mesh", action="store_true", help="--drift with PME, periodic only")
  ap.add_argument("--reciprocal", action="store_true", help="time PME against the vector sum")
  ap.add_argument("--one", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.make:
    t0 = time.perf_counter()
    make(out)
    print(f"pool and curves made in {time.perf_counter() - t0:.0f} s")
    return 0
  if args.report:
    report(out)
    return 0
  if args.cost:
    cost(out)
    return 0
  if args.drift:
    drift(out, mesh=args.mesh)
    return 0
  if args.reciprocal:
    reciprocal(out)
    return 0
  if args.one:
    train_one(out, args.one, args.minutes)
    return 0
  cores = sorted(os.sched_getaffinity(0))
  procs = []
  for k, name in enumerate(args.models.split(",")):
    cmd = [
      sys.executable,
      __file__,
      "--out",
      str(out),
      "--minutes",
      str(args.minutes),
      "--one",
      name,
    ]
    if args.jobs > 1:
      cmd = ["taskset", "-c", str(cores[k % len(cores)])] + cmd
    procs.append(subprocess.Popen(cmd))
    if args.jobs == 1:
      procs[-1].wait()
  if any(p.wait() for p in procs):
    raise SystemExit("a training run failed")
  report(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
