"""eqattn inside LAMMPS: time per MD step on 1 and 2 MPI ranks against the JAX-MD engine.

FCC copper (a = 3.61 Å, n x n x n cubic cells, 4 n^3 atoms) with the shipped copper model
(cutoff 4.5 Å, receptive field 13.5 Å), float32, NVE from 300 K, 1 fs steps, skin 1 Å:

* ``LAMMPS, r ranks``: ``mpirun -np r python -m plugin.lammps`` on an input that runs
  ``--warmup`` steps (compilation), then ``--steps`` timed steps; the figure is LAMMPS' own
  "Loop time" of the timed run / steps. The decomposition is ``processors * 1 1`` (slabs along
  x: y and z stay undivided, so only the x faces carry ghosts). Every step rebuilds the pair
  list among the rank's rows on the host (vesin) and runs the model's stages, exchanging
  features between them. Each rank count runs unbound (XLA's threads use every core) and
  bound to one core per rank (``mpirun -bind-to core``, the usual one-rank-per-core setup).
* ghost overhead: rows evaluated per local atom (``plugin.lammps`` reports it, summed over
  ranks and steps): 1 on one rank; with r slabs of width L / r about
  ``1 + 2 (4.5 + 1) r / L`` (ghost rows are read as neighbours; only local atoms centre pairs).
* ``JAX-MD``: ``plugin.md.run(..., ensemble="nve")`` on the same crystal, skin 1 Å: median time
  of a ``--chunk``-step chunk per step after a compiled warm-up chunk (velocity Verlet and the
  JAX-MD list inside ``lax.fori_loop``).

Targets (issue 19): 2 ranks <= 0.65 x the 1-rank time at 32000 atoms; 1 rank <= 1.3 x JAX-MD.
Run it on cores not shared with other jobs (``taskset``), since ranks compete for them. Large
systems run ~1.4-1.7x faster with transparent huge pages for glibc's large allocations
(glibc >= 2.35): set ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` for every configuration alike.

    python benchmarks/lammps.py                          # 4000 atoms
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/lammps.py --cells 20 --steps 3 \
      --warmup 2 --chunks 1 --chunk 5                    # 32000 atoms
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIN = 1.0
INPUT = """units metal
atom_style atomic
boundary p p p
processors * 1 1
lattice fcc 3.61
region box block 0 {n} 0 {n} 0 {n}
create_box 1 box
create_atoms 1 box
mass 1 63.546
displace_atoms all random 0.05 0.05 0.05 4321 units box
pair_style eqattn copper
pair_coeff * * Cu
neighbor {skin} bin
neigh_modify every 1 delay 0 check yes
velocity all create 300.0 4928459 mom yes rot no dist gaussian
timestep 0.001
fix nve all nve
thermo {steps}
run {warmup}
run {steps}
"""


def lammps_step_ms(
  n: int, ranks: int, steps: int, warmup: int, bind: bool = False
) -> tuple[float, float, float]:
  """(ms per timed step, ghost overhead, wall time of the whole run in s); ``bind``: one core
  per rank (``mpirun -bind-to core``), so XLA runs one thread per rank."""
  mpirun = shutil.which(
    "mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
  )
  with tempfile.TemporaryDirectory() as folder:
    Path(folder, "in.bench").write_text(INPUT.format(n=n, skin=SKIN, steps=steps, warmup=warmup))
    env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    t = time.perf_counter()
    done = subprocess.run(
      [
        mpirun,
        "-np",
        str(ranks),
        *(["-bind-to", "core"] if bind else []),
        sys.executable,
        "-m",
        "plugin.lammps",
        "in.bench",
        "--log",
        "none",
      ],
      cwd=folder,
      env=env,
      capture_output=True,
      text=True,
    )
    wall = time.perf_counter() - t
  if done.returncode:
    raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
  loops = re.findall(r"Loop time of ([\d.eE+-]+) on \d+ procs for (\d+) steps", done.stdout)
  seconds, count = loops[-1]
  overhead = float(re.search(r"ghost overhead ([\d.]+)", done.stdout).group(1))
  return 1e3 * float(seconds) / int(count), overhead, wall


def jax_md_step_ms(n: int, chunks: int, chunk: int) -> tuple[float, float]:
  """(ms per step, wall time of the compiled warm-up in s) of plugin.md.run on the crystal."""
  import ase.build

  import plugin.md as md
  import potentials

  atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
  atoms.rattle(0.05, seed=0)
  atoms.wrap()
  potential = potentials.load("copper")
  kw = dict(ensemble="nve", temperature=300.0, timestep=1.0, chunk=chunk, dr_threshold=SKIN)
  t = time.perf_counter()
  md.run(atoms, potential, total_steps=chunk, **kw)
  warm = time.perf_counter() - t
  result = md.run(atoms, potential, total_steps=chunks * chunk, **kw)
  return 1e3 * statistics.median(result.chunk_times_s) / chunk, warm


CONFIGS = {"1": (1, False), "1-bound": (1, True), "2-bound": (2, True), "2": (2, False)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--cells",
    type=int,
    nargs="+",
    default=[10],
    help="n of n^3 cubic cells (10: 4000 atoms, 20: 32000)",
  )
  ap.add_argument(
    "--runs",
    nargs="+",
    default=["1", "1-bound", "2-bound"],
    choices=list(CONFIGS),
    help="LAMMPS runs: ranks, '-bound' for one core per rank",
  )
  ap.add_argument("--steps", type=int, default=10, help="timed LAMMPS steps")
  ap.add_argument("--warmup", type=int, default=3, help="LAMMPS steps before timing")
  ap.add_argument("--chunks", type=int, default=3, help="timed JAX-MD chunks (median)")
  ap.add_argument("--chunk", type=int, default=10, help="steps per JAX-MD chunk")
  args = ap.parse_args()
  import jax

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
    f"(affinity {len(os.sched_getaffinity(0))}), float32, shipped copper model, skin "
    f"{SKIN} Å, NVE 1 fs, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}\n"
  )
  print(
    "| atoms | engine | ranks | cores per rank | ms / step | vs JAX-MD | vs 1 rank | "
    "vs 1 rank on 1 core | rows / local atom | run wall (s) |"
  )
  print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
  for n in args.cells:
    atoms = 4 * n**3
    jm, warm = jax_md_step_ms(n, args.chunks, args.chunk)
    print(
      f"| {atoms} | JAX-MD (plugin.md.run) | 1 | all | {jm:.1f} | 1.00 | | | 1.00 | {warm:.0f} |",
      flush=True,
    )
    times = {}
    for run in args.runs:
      ranks, bind = CONFIGS[run]
      ms, overhead, wall = lammps_step_ms(n, ranks, args.steps, args.warmup, bind)
      times[run] = ms
      vs = lambda ref: f"{ms / times[ref]:.2f}" if ref in times else ""
      print(
        f"| {atoms} | LAMMPS + eqattn | {ranks} | {'1' if bind else 'all'} | {ms:.1f} | "
        f"{ms / jm:.2f} | {vs('1')} | {vs('1-bound')} | {overhead:.2f} | {wall:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
