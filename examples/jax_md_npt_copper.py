"""JAX-MD NPT of FCC copper with the shipped ``copper`` model, through ``plugin.md.run``.

Starts from a cubic FCC supercell at lattice constant ``--a0``, runs isotropic Nose-Hoover NPT
(JAX-MD's ``simulate.npt_nose_hoover``, with the driver's fractional-coordinate fix) at the
given temperature and pressure, and reports the equilibrium lattice constant, temperature and
pressure averaged over the second half of the run::

    python examples/jax_md_npt_copper.py                        # 108 atoms, 600 K, 1 bar, 0.8 ps
    python examples/jax_md_npt_copper.py --temperature 900 --pressure 10000 --out hot.traj

The trajectory (with cells) goes to ``--out``, the per-step log to ``--log``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from ase.build import bulk

import potentials
import plugin.md


def main(argv: Optional[List[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="copper", help="shipped model name or .eqm path")
  ap.add_argument("--repeat", type=int, default=3, help="cubic cells per side (4 atoms each)")
  ap.add_argument("--a0", type=float, default=3.63, help="starting lattice constant, Å")
  ap.add_argument("--temperature", type=float, default=600.0, help="K")
  ap.add_argument("--pressure", type=float, default=1.01325, help="bar")
  ap.add_argument("--dt", type=float, default=2.0, help="timestep in fs")
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--tau-t", type=float, default=100.0, help="thermostat time, fs")
  ap.add_argument("--tau-p", type=float, default=500.0, help="barostat time, fs")
  ap.add_argument("--out", default="copper_npt.traj")
  ap.add_argument("--log", default="copper_npt.csv")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  atoms = bulk("Cu", "fcc", a=args.a0, cubic=True).repeat(args.repeat)
  pot = potentials.load(args.model)
  result = plugin.md.run(
    atoms,
    pot,
    ensemble="npt",
    temperature=args.temperature,
    pressure=args.pressure,
    timestep=args.dt,
    total_steps=args.steps,
    tau_t=args.tau_t,
    tau_p=args.tau_p,
    log_interval=max(1, args.steps // 100),
    traj=args.out,
    traj_interval=max(1, args.steps // 20),
    log_file=args.log,
    seed=args.seed,
    progress=True,
  )
  log = result.log
  late = log.step >= log.step[-1] / 2  # second half: after the box has settled
  n_cells = args.repeat**3
  a = (log.volume[late] / n_cells) ** (1.0 / 3.0)
  out = {
    "lattice_constant": float(a.mean()),
    "lattice_constant_std": float(a.std()),
    "temperature": float(log.temperature[late].mean()),
    "pressure_bar": float(log.pressure[late].mean()),
    "conserved_drift_ev": float(log.conserved[-1] - log.conserved[0]),
  }
  print(
    f"{len(atoms)} Cu atoms, {args.steps} steps of {args.dt} fs "
    f"({result.wall_time_s:.1f} s incl. compilation)"
  )
  print(
    f"second half: a = {out['lattice_constant']:.4f} ± {out['lattice_constant_std']:.4f} Å, "
    f"T = {out['temperature']:.1f} K, P = {out['pressure_bar']:.0f} bar "
    f"(instantaneous pressure fluctuates by ~1e3 bar in a box this small)"
  )
  print(
    f"change of the NPT conserved quantity: {out['conserved_drift_ev'] * 1e3:+.3f} meV; "
    f"trajectory {args.out}, log {args.log}"
  )
  return out


if __name__ == "__main__":
  main()
