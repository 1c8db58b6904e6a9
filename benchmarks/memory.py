"""Memory and time of one energy + forces call of a shipped model, by system size.

FCC crystals (a = 3.61 Å, n x n x n cubic cells, rattled; ``benchmarks/md.py``'s) through the
JAX-MD energy of :func:`plugin.jax_md.neighbor_list` (the MD engine's path, skin 1 Å),
float32, one jitted ``value_and_grad``. "temp" is XLA's temporary buffer for the call
(``memory_analysis``), which XLA:CPU allocates in one piece: what decides whether a system
fits in memory. Use it to size systems (MB per atom) and to compare commits side by side:

    python benchmarks/memory.py                         # copper, 256 / 864 / 4000 atoms
    python benchmarks/memory.py --model copper --cells 4 10 --repeats 5
"""

from __future__ import annotations

import argparse

import jax

import potentials


def measure(model: str, cells: int, repeats: int) -> dict:
  from md import driver_energy, fcc_copper, median_time

  atoms = fcc_copper(4 * cells**3)
  energy_fn, _, R, nbrs = driver_energy(potentials.load(model), atoms, dr_threshold=1.0)
  step = jax.jit(jax.value_and_grad(lambda r, nb: energy_fn(r, neighbor=nb)))
  mem = step.lower(R, nbrs).compile().memory_analysis()
  jax.block_until_ready(step(R, nbrs))
  seconds = median_time(lambda: step(R, nbrs), repeats)
  n = len(atoms)
  return dict(
    atoms=n,
    pairs=int(nbrs.idx.shape[-1]),
    temp_gb=mem.temp_size_in_bytes / 1e9,
    mb_per_atom=mem.temp_size_in_bytes / 1e6 / n,
    ms=1e3 * seconds,
    us_per_atom=1e6 * seconds / n,
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
