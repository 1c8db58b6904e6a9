"""ASE molecular dynamics of ethanol with the shipped ``ethanol`` model.

Langevin thermalisation at the target temperature, then constant-energy (velocity Verlet) MD,
all with ASE's own integrators; the eqattn calculator is just ``atoms.calc``::

    python examples/ase_md_ethanol.py                      # 0.5 ps NVT + 0.5 ps NVE, 300 K
    python examples/ase_md_ethanol.py --temperature 500 --nve-steps 4000 --out hot.traj

Prints a log line every ``--log-every`` steps and the NVE energy drift at the end; the
trajectory (positions, energies, forces) goes to ``--out``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import numpy as np
from ase import units
from ase.build import molecule
from ase.io.trajectory import Trajectory
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation

try:  # ASE >= 3.27
  from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
  from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

  thermalize_momenta = lambda atoms, temperature_K, rng: _mb(
    atoms, temperature_K=temperature_K, rng=rng
  )
from ase.md.verlet import VelocityVerlet

import potentials
from plugin.ase import Calculator


def main(argv: Optional[List[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="ethanol", help="shipped model name or .eqm path")
  ap.add_argument("--temperature", type=float, default=300.0, help="K")
  ap.add_argument("--dt", type=float, default=0.5, help="timestep in fs")
  ap.add_argument("--nvt-steps", type=int, default=1000)
  ap.add_argument("--nve-steps", type=int, default=1000)
  ap.add_argument("--log-every", type=int, default=200)
  ap.add_argument("--out", default="ethanol_ase.traj")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  atoms = molecule("CH3CH2OH")
  atoms.calc = Calculator(potentials.load(args.model))
  thermalize_momenta(atoms, args.temperature, rng=np.random.default_rng(args.seed))
  Stationary(atoms)  # no drift or spin of the whole molecule
  ZeroRotation(atoms)

  traj = Trajectory(args.out, "w", atoms)
  n = len(atoms)

  def report(dyn, phase):
    epot = atoms.get_potential_energy()
    ekin = atoms.get_kinetic_energy()
    print(
      f"{phase} step {dyn.nsteps:6d}  t {dyn.get_time() / units.fs / 1000:6.3f} ps  "
      f"T {atoms.get_temperature():6.1f} K  Epot {epot:10.4f} eV  "
      f"Etot {epot + ekin:10.4f} eV",
      flush=True,
    )

  nvt = Langevin(
    atoms,
    args.dt * units.fs,
    temperature_K=args.temperature,
    friction=0.02 / units.fs,
    fixcm=False,
    rng=np.random.default_rng(args.seed + 1),
  )
  nvt.attach(report, interval=args.log_every, dyn=nvt, phase="NVT")
  nvt.attach(traj.write, interval=args.log_every)
  nvt.run(args.nvt_steps)

  nve = VelocityVerlet(atoms, args.dt * units.fs)
  etot = []
  nve.attach(lambda: etot.append(atoms.get_total_energy()), interval=1)
  nve.attach(report, interval=args.log_every, dyn=nve, phase="NVE")
  nve.attach(traj.write, interval=args.log_every)
  nve.run(args.nve_steps)
  traj.close()

  etot = np.asarray(etot) / n
  t_ps = np.arange(len(etot)) * args.dt / 1000.0
  drift = np.polyfit(t_ps, etot, 1)[0] * 1e3 if len(etot) > 2 else float("nan")
  summary = {
    "drift_mev_atom_ps": float(drift),
    "fluctuation_mev_atom": float(np.std(etot) * 1e3),
    "compilations": atoms.calc.num_compilations,
  }
  print(
    f"NVE: drift {summary['drift_mev_atom_ps']:+.4f} meV/atom/ps, RMS fluctuation "
    f"{summary['fluctuation_mev_atom']:.4f} meV/atom; {summary['compilations']} "
    f"compilation(s); trajectory in {args.out}"
  )
  return summary


if __name__ == "__main__":
  main()
