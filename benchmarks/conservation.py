"""Energy-conservation table of the shipped models: drift and integrator order, both engines.

For each system (``ethanol``: the shipped ethanol model on one molecule, 300 K, 0.5 fs;
``copper``: the shipped copper model on a periodic 3x3x3 cubic FCC cell, 108 atoms, 600 K,
2 fs) and each engine (ASE's velocity Verlet with ``plugin.ase.Calculator``; JAX-MD's
``simulate.nve`` with ``plugin.jax_md.neighbor_list``, lists rebuilt during the run):

* float32, ``--duration`` ps (default 20): drift of the total energy per atom (meV/atom/ps,
  slope after a 1 ps warm-up, with its block-averaged standard error) and RMS fluctuation;
  target |drift| <= 0.05 meV/atom/ps;
* float64, ``--order-duration`` ps (default 2), run again at half the timestep: the ratio of the
  fluctuations, ~4 for velocity Verlet with smooth forces; target 3.5-4.5.

All rows come from ``plugin.testing.check_energy_conservation``::

    python benchmarks/conservation.py                        # the full table (~1 h on 2 cores)
    python benchmarks/conservation.py --systems copper --engines jax-md --duration 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 rows; float32 rows cast explicitly

from ase.build import bulk, molecule  # noqa: E402

import potentials  # noqa: E402
from plugin.testing import check_energy_conservation, engine_kwargs  # noqa: E402

SYSTEMS = {
  "ethanol": dict(
    model="ethanol", atoms=lambda: molecule("CH3CH2OH"), temperature=300.0, timestep=0.5
  ),
  "copper": dict(
    model="copper",
    atoms=lambda: bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3),
    temperature=600.0,
    timestep=2.0,
  ),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
  ap.add_argument("--engines", nargs="+", default=["ase", "jax-md"], choices=["ase", "jax-md"])
  ap.add_argument(
    "--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"]
  )
  ap.add_argument("--duration", type=float, default=20.0, help="ps, float32 drift runs")
  ap.add_argument("--order-duration", type=float, default=2.0, help="ps, float64 order runs")
  ap.add_argument("--json", default=None, help="also write the rows here")
  args = ap.parse_args(argv)

  rows = []
  print(
    "| system | engine | dtype | dt (fs) | length (ps) | drift (meV/atom/ps) | "
    "fluctuation (meV/atom) | mean T (K) | dt-halving ratio | wall (s) |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name in args.systems:
    spec = SYSTEMS[name]
    pot = potentials.load(spec["model"])
    for dtype in args.dtypes:
      order = dtype == "float64"
      duration = args.order_duration if order else args.duration
      for engine in args.engines:
        atoms = spec["atoms"]()
        start = time.perf_counter()
        report = check_energy_conservation(
          atoms,
          temperature=spec["temperature"],
          timestep=spec["timestep"],
          duration=duration,
          warmup=min(1.0, 0.1 * duration),
          sample_interval=10,
          check_order=order,
          **engine_kwargs(engine, pot, atoms, dtype),
        )
        wall = time.perf_counter() - start
        row = dict(
          system=name,
          engine=engine,
          dtype=dtype,
          dt=spec["timestep"],
          length=duration,
          drift=report.drift,
          drift_error=report.drift_error,
          fluctuation=report.fluctuation,
          mean_T=report.mean_temperature,
          ratio=report.order_ratio,
          wall=wall,
        )
        rows.append(row)
        ratio = "—" if report.order_ratio is None else f"{report.order_ratio:.2f}"
        print(
          f"| {name} | {engine} | {dtype} | {spec['timestep']:g} | {duration:g} | "
          f"{report.drift:+.5f} ± {report.drift_error:.5f} | {report.fluctuation:.4f} | "
          f"{report.mean_temperature:.0f} | {ratio} | {wall:.0f} |",
          flush=True,
        )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
