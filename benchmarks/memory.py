"""Memory and time of one energy + forces call of a shipped model, by system size.

FCC crystals (a = 3.61 Å, n x n x n cubic cells, rattled) through the JAX-MD energy of
:func:`plugin.jax_md.neighbor_list` (the MD engine's path), float32, one jitted
``value_and_grad``. "temp" is XLA's temporary buffer for the call (``memory_analysis``), which
XLA:CPU allocates in one piece: what decides whether a system fits in memory. Use it to size
systems (MB per atom) and to compare commits side by side:

    python benchmarks/memory.py                         # copper, 256 / 864 / 4000 atoms
    python benchmarks/memory.py --model copper --cells 4 10 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def measure(model: str, cells: int, repeats: int) -> dict:
  import ase.build
  import jax
  import jax.numpy as jnp
  from jax_md import space

  import plugin.jax_md as pjm
  import potentials

  pot = potentials.load(model)
  atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(cells)
  atoms.rattle(0.05, seed=0)
  box = np.asarray(atoms.cell.array)
  displacement, _ = space.periodic_general(box, fractional_coordinates=True)
  neighbor_fn, energy_fn = pjm.neighbor_list(
    pot, displacement, box, species=atoms.numbers, dr_threshold=1.0, fractional_coordinates=True
  )
  R = jnp.asarray(atoms.get_scaled_positions(), jnp.float32)
  nbrs = neighbor_fn.allocate(R)
  step = jax.jit(jax.value_and_grad(lambda r, nb: energy_fn(r, neighbor=nb)))
  mem = step.lower(R, nbrs).compile().memory_analysis()
  jax.block_until_ready(step(R, nbrs))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(step(R, nbrs))
    times.append(time.perf_counter() - t)
  n = len(atoms)
  return dict(
    atoms=n,
    pairs=int(nbrs.idx.shape[-1]),
    temp_gb=mem.temp_size_in_bytes / 1e9,
    mb_per_atom=mem.temp_size_in_bytes / 1e6 / n,
    ms=1e3 * float(np.median(times)),
    us_per_atom=1e6 * float(np.median(times)) / n,
  )


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="copper", help="a shipped model of copper (Cu only)")
  ap.add_argument("--cells", type=int, nargs="+", default=[4, 6, 10])
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  print("| atoms | pair capacity | temp (GB) | MB / atom | E+F (ms) | µs / atom |")
  print("|---:|---:|---:|---:|---:|---:|")
  for n in args.cells:
    r = measure(args.model, n, args.repeats)
    print(
      f"| {r['atoms']} | {r['pairs']} | {r['temp_gb']:.2f} | {r['mb_per_atom']:.2f} | "
      f"{r['ms']:.1f} | {r['us_per_atom']:.1f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
