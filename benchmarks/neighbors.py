"""Neighbour-list speed: vesin vs ase.neighborlist (and matscipy) on FCC copper.

Times a full pair list (i, j, cell shifts) for cutoff 5 Å on rattled FCC Cu supercells of about
1k, 10k and 100k atoms. For each size every library runs once per repeat, interleaved, after one
untimed warm-up call; the table shows medians. Columns:

* ``vesin``: raw ``vesin.NeighborList.compute(..., "ijS")`` (unsorted),
* ``neighbor_pairs``: ``plugin.neighbors.neighbor_pairs`` (vesin + input checks + sort by dst),
* ``ase``: ``ase.neighborlist.neighbor_list("ijS", ...)``,
* ``matscipy``: ``matscipy.neighbours.neighbour_list("ijS", ...)`` if importable.

Run::

    python benchmarks/neighbors.py            # 1k, 10k, 100k atoms
    python benchmarks/neighbors.py --quick    # skip 100k
    python benchmarks/neighbors.py --sizes 500 5000 --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import ase
import ase.build
import ase.neighborlist
import vesin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plugin.neighbors import neighbor_pairs  # noqa: E402

try:
  import matscipy.neighbours as matscipy_neighbours
except ImportError:  # optional
  matscipy_neighbours = None

CUTOFF = 5.0
LATTICE = 3.61  # Cu, Å


def fcc_copper(target_atoms: int, seed: int = 0) -> ase.Atoms:
  """Rattled cubic FCC Cu supercell with at least ``target_atoms`` atoms (4 per cubic cell)."""
  reps = [max(1, math.floor((target_atoms / 4) ** (1 / 3)))] * 3
  axis = 2
  while 4 * math.prod(reps) < target_atoms:
    reps[axis] += 1
    axis = (axis - 1) % 3
  atoms = ase.build.bulk("Cu", "fcc", a=LATTICE, cubic=True) * tuple(reps)
  atoms.rattle(0.05, seed=seed)
  return atoms


def default_repeats(n_atoms: int) -> int:
  if n_atoms >= 50_000:
    return 3
  if n_atoms >= 5_000:
    return 5
  return 9


def bench(atoms: ase.Atoms, repeats: int, threads: int) -> dict[str, float | int]:
  pos, cell, pbc = atoms.positions, atoms.cell.array, atoms.pbc
  nl = vesin.NeighborList(cutoff=CUTOFF, full_list=True, n_threads=threads)
  runners = {
    "vesin": lambda: nl.compute(pos, cell, pbc, "ijS")[0],
    "neighbor_pairs": lambda: neighbor_pairs(pos, cell, pbc, CUTOFF, n_threads=threads)[0],
    "ase": lambda: ase.neighborlist.neighbor_list("ijS", atoms, CUTOFF)[0],
  }
  if matscipy_neighbours is not None:
    runners["matscipy"] = lambda: matscipy_neighbours.neighbour_list("ijS", atoms, CUTOFF)[0]

  counts = {name: len(run()) for name, run in runners.items()}  # warm-up, untimed
  if len(set(counts.values())) != 1:
    raise RuntimeError(f"pair counts disagree: {counts}")

  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  out: dict[str, float | int] = {"atoms": len(atoms), "pairs": counts["vesin"], "repeats": repeats}
  out.update({name: 1e3 * statistics.median(ts) for name, ts in times.items()})
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--sizes",
    type=int,
    nargs="+",
    default=[1_000, 10_000, 100_000],
    help="target atom counts (default: 1000 10000 100000)",
  )
  parser.add_argument("--quick", action="store_true", help="skip sizes above 20k atoms")
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed repeats per size (default: 9 / 5 / 3 by size)"
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=0,
    help="vesin threads (0 = vesin default: OMP_NUM_THREADS or all cores)",
  )
  args = parser.parse_args(argv)

  sizes = [s for s in args.sizes if not (args.quick and s > 20_000)]
  import ase as _ase

  print(f"# FCC Cu (a = {LATTICE} Å, rattled 0.05 Å), cutoff {CUTOFF} Å, full list i,j,S")
  print(
    f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"python {platform.python_version()}, vesin {vesin.__version__} "
    f"(threads={args.threads or 'default'}), ase {_ase.__version__}, "
    + (
      f"matscipy {getattr(sys.modules.get('matscipy'), '__version__', '?')}"
      if matscipy_neighbours is not None
      else "matscipy not installed"
    )
  )
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
  print(f"# load average before the run: {load}")
  print("# medians of interleaved repeats, milliseconds; ase/matscipy are single-threaded\n")

  has_ms = matscipy_neighbours is not None
  header = "| atoms | pairs | repeats | vesin ms | neighbor_pairs ms | ase ms |"
  header += " matscipy ms |" if has_ms else ""
  header += " ase / vesin |"
  print(header)
  print("|" + "---:|" * (header.count("|") - 1))
  for size in sizes:
    atoms = fcc_copper(size)
    r = bench(atoms, args.repeats or default_repeats(len(atoms)), args.threads)
    row = (
      f"| {r['atoms']} | {r['pairs']} | {r['repeats']} | {r['vesin']:.2f} | "
      f"{r['neighbor_pairs']:.2f} | {r['ase']:.1f} |"
    )
    if has_ms:
      row += f" {r['matscipy']:.2f} |"
    row += f" {r['ase'] / r['vesin']:.1f}x |"
    print(row, flush=True)


if __name__ == "__main__":
  main()
