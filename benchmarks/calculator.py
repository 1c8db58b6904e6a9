"""ASE calculator overhead: ``Calculator.get_forces()`` vs a bare jitted energy+forces call.

For FCC Cu supercells (64 and 1000 atoms by default, rattled) and the default model
(``Potential.create(0, species=["Cu"])``, cutoff 5 Å, float32), times

* ``bare``: a jitted ``jax.value_and_grad`` of the summed per-atom energies
  (``Potential.atomic_energies_fn``) on the same padded arrays the calculator uses (same atom and
  pair capacities, fixed pair list), new positions each call, forces copied back to NumPy;
* ``calculator``: ``atoms.get_forces()`` with ``plugin.ase.Calculator`` after moving the atoms
  (so ASE really recomputes): ASE's state check, the full neighbour-list rebuild, padding,
  the model (energy, per-atom energies, forces and the strain derivative for the stress) and
  float64 results.

Both run once per repeat, interleaved, after untimed warm-up calls; the table shows medians.

Run::

    python benchmarks/calculator.py                  # 64 and 1000 atoms
    python benchmarks/calculator.py --repeats 31 --sizes 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import ase.build
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import potentials  # noqa: E402
from plugin.ase import Calculator  # noqa: E402
from plugin.neighbors import NeighborListBuilder  # noqa: E402

LATTICE = 3.61  # Cu, Å
REPLICAS = {64: (2, 2, 4), 1000: (5, 5, 10)}  # cubic 4-atom cells


def copper(num_atoms: int, seed: int = 0) -> ase.Atoms:
  reps = REPLICAS.get(num_atoms)
  if reps is None:
    raise SystemExit(f"size {num_atoms} not in {sorted(REPLICAS)}")
  atoms = ase.build.bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat(reps)
  atoms.rattle(0.05, seed=seed)
  return atoms


def bench(pot: potentials.Potential, num_atoms: int, repeats: int) -> dict[str, float]:
  atoms = copper(num_atoms)
  calc = Calculator(pot)  # float32
  atoms.calc = calc
  atoms.get_forces()  # sizes the capacities (and compiles)
  base = atoms.get_positions()
  rng = np.random.default_rng(1)
  moves = [base + rng.normal(0, 0.01, base.shape) for _ in range(repeats + 2)]

  # The bare call gets the arrays the calculator would use: same capacities and padding.
  n, na, dtype = len(atoms), calc.atom_capacity, calc.dtype
  pairs = NeighborListBuilder(pot.cutoff, shift_dtype=dtype).build(
    base, atoms.cell.array, atoms.pbc
  )
  cap = calc.neighbors.capacity
  dst = np.full(cap, na, np.int32)
  src = np.full(cap, na, np.int32)
  shifts = np.zeros((cap, 3), dtype)
  k = pairs.num_pairs
  dst[:k], src[:k], shifts[:k] = pairs.dst[:k], pairs.src[:k], pairs.shifts[:k]
  species = jnp.zeros(na, jnp.int32)
  mask = jnp.asarray(np.arange(na) < n)
  cell = jnp.asarray(atoms.cell.array, dtype)
  params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), pot.params)
  energies_fn = pot.atomic_energies_fn(include_shift=False)

  def total(params, positions):
    return jnp.sum(energies_fn(params, species, positions, dst, src, shifts, cell, mask, True))

  energy_forces = jax.jit(jax.value_and_grad(total, argnums=1))
  padded = np.zeros((na, 3), dtype)

  def run_bare(pos: np.ndarray) -> np.ndarray:
    padded[:n] = pos
    e, g = energy_forces(params, padded)
    return -np.asarray(g)[:n]

  def run_calc(pos: np.ndarray) -> np.ndarray:
    atoms.positions = pos
    return atoms.get_forces()

  for pos in moves[:2]:  # warm-up (compilation)
    run_bare(pos)
    run_calc(pos)
  compilations = calc.num_compilations
  bare, full = [], []
  for pos in moves[2:]:
    t0 = time.perf_counter()
    run_bare(pos)
    t1 = time.perf_counter()
    run_calc(pos)
    t2 = time.perf_counter()
    bare.append(t1 - t0)
    full.append(t2 - t1)
  assert calc.num_compilations == compilations, "the calculator recompiled while timing"
  b, c = statistics.median(bare), statistics.median(full)
  return {
    "atoms": n,
    "pairs": k,
    "atom_capacity": na,
    "pair_capacity": cap,
    "bare_ms": 1e3 * b,
    "calc_ms": 1e3 * c,
    "ratio": c / b,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1000])
  parser.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="timed calls per size (default: 41 for <= 100 atoms, else 9)",
  )
  args = parser.parse_args()

  pot = potentials.Potential.create(0, species=["Cu"])
  print(
    f"# plugin.ase.Calculator vs bare jitted energy+forces (float32, cutoff "
    f"{pot.cutoff:g} Å, default model)"
  )
  print(
    f"# jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or '?'}"
    f", {os.cpu_count()} CPUs; medians of interleaved calls\n"
  )
  print("| atoms | pairs (capacity) | bare ms | calculator ms | ratio |")
  print("|---:|---:|---:|---:|---:|")
  for size in args.sizes:
    repeats = args.repeats or (41 if size <= 100 else 9)
    r = bench(pot, size, repeats)
    print(
      f"| {r['atoms']} | {r['pairs']} ({r['pair_capacity']}) | {r['bare_ms']:.2f} | "
      f"{r['calc_ms']:.2f} | {r['ratio']:.3f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
