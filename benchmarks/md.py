"""MD driver overhead: time per step of ``plugin.md.run`` vs one bare energy + forces call.

For rattled FCC Cu supercells (a = 3.61 Å, 300 K) and the default model
(``Potential.create(0, species=["Cu"])``, cutoff 5 Å, float32), two things are timed on the
same system and the same JAX-MD neighbour list (``plugin.jax_md.neighbor_list``, fractional
coordinates, skin 0.5 Å, capacity multiplier 1.25):

* ``bare``: one jitted ``jax.value_and_grad(energy_fn)(R, nbrs)``: the model's energy and
  forces, nothing else (median of ``--repeats`` calls after a warm-up);
* ``looped``: the same forces in a jitted ``lax.fori_loop`` of 20 iterations, each moving the
  atoms a little along the forces (``shift_fn(R, 1e-4 F)``, the list fixed): the model's cost
  per step when it runs inside a loop, without integrator or list upkeep;
* ``per step``: ``plugin.md.run(..., ensemble="nve", chunk=100)``, i.e. velocity Verlet, the
  neighbour-list update (and its rebuilds) inside ``lax.fori_loop``, a log row per chunk (one
  energy + virial evaluation per 100 steps) and the host's per-chunk checks: the median time
  of a 100-step chunk / 100, over ``--chunks`` chunks after a compiled warm-up run.

Small cells (``--small-atoms``, default 32): the same NVE run of the shipped copper model
(``potentials.load("copper")``, cutoff 4.5 Å) on a cubic cell narrower than 2 x (cutoff + skin)
= 10 Å, where ``plugin.jax_md`` uses its neighbour list with periodic images, against the ASE
engine on the same cell (ASE's ``VelocityVerlet`` with ``plugin.ase.Calculator``, float32, as
``eqattn md --engine ase``): median time per step of 100-step runs after a warm-up, alternating,
fastest round of each. Target: JAX-MD <= 0.5x the ASE engine.

``ratio = per step / bare``; the target is <= 1.10 (integrator and list upkeep cost at most
10 %). ``ratio (loop) = per step / looped`` isolates that upkeep from what a loop saves by
itself: on CPU a loop reuses XLA's temporary buffers between iterations, which a separate call
allocates afresh, so a step in a loop can be cheaper than one bare call. Measurements
alternate and the table keeps the fastest round of each, so machine load (shared CPUs)
affects them alike; on a busy machine repeat the run.

    python benchmarks/md.py                       # 256 atoms, then the 32-atom small cell
    python benchmarks/md.py --atoms 256 864 --chunks 5
    python benchmarks/md.py --atoms --small-atoms 32     # only the small-cell row
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import ase.build
import jax
import jax.numpy as jnp
from jax_md import space

import plugin.jax_md as pjm
import plugin.md as md
import potentials

CHUNK = 100
SKIN = 0.5
LATTICE = 3.61


def fcc_copper(target_atoms: int, seed: int = 0) -> ase.Atoms:
  """Rattled cubic FCC Cu supercell with about ``target_atoms`` atoms (4 per cubic cell)."""
  reps = max(1, round((target_atoms / 4) ** (1 / 3)))
  atoms = ase.build.bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat(reps)
  atoms.rattle(0.05, seed=seed)
  atoms.wrap()
  return atoms


LOOP = 20


def driver_energy(potential, atoms, dr_threshold: float = SKIN):
  """The MD driver's space, list and energy on periodic ``atoms``: ``(energy_fn, shift_fn, R,
  nbrs)`` with ``R`` fractional, float32."""
  box = atoms.cell.array.T
  displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=True)
  neighbor_fn, energy_fn = pjm.neighbor_list(
    potential,
    displacement_fn,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=dr_threshold,
    capacity_multiplier=1.25,
    fractional_coordinates=True,
  )
  R = jnp.asarray(atoms.get_scaled_positions(), jnp.float32)
  return energy_fn, shift_fn, R, neighbor_fn.allocate(R)


def bare_fns(potential, atoms):
  """Jitted energy + forces and a jitted loop of them on the driver's space and list; the
  positions and the list."""
  energy_fn, shift_fn, R, nbrs = driver_energy(potential, atoms)
  f = jax.jit(jax.value_and_grad(energy_fn))

  def descend(i, R):
    return shift_fn(R, -1e-4 * jax.grad(energy_fn)(R, nbrs))

  loop = jax.jit(lambda R: jax.lax.fori_loop(0, LOOP, descend, R))
  jax.block_until_ready(f(R, nbrs))  # compile
  jax.block_until_ready(loop(R))
  return f, loop, R, nbrs


def median_time(fn, repeats: int, per: int = 1) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t) / per)
  return statistics.median(times)


def small_cell_row(n: int, rounds: int, chunks: int, repeats: int):
  """(atoms, box width, list type, pair capacity, bare E+F ms, JAX-MD ms/step, ASE ms/step) on
  the shipped copper model, NVE, float32, the same cell and start for both engines."""
  from ase import units
  from ase.md.verlet import VelocityVerlet

  from plugin.ase import Calculator

  potential = potentials.load("copper")
  atoms = fcc_copper(n)
  width = pjm.box_widths(atoms.cell.array.T).min()
  assert width < 2 * (potential.cutoff + SKIN), "not a small cell"
  f, _, R, nbrs = bare_fns(potential, atoms)
  kw = dict(
    ensemble="nve",
    temperature=300.0,
    timestep=1.0,
    chunk=CHUNK,
    dr_threshold=SKIN,
    capacity_multiplier=1.25,
  )
  warm = md.run(atoms, potential, total_steps=CHUNK, **kw)  # compiles
  ase_atoms = warm.atoms.copy()  # thermalised start (positions and momenta)
  ase_atoms.calc = Calculator(potential)
  dyn = VelocityVerlet(ase_atoms, timestep=1.0 * units.fs)
  dyn.run(CHUNK)  # compiles the calculator's shapes
  bare, jax_md_ms, ase_ms = [], [], []
  for _ in range(rounds):
    bare.append(1e3 * median_time(lambda: f(R, nbrs), repeats))
    result = md.run(atoms, potential, total_steps=chunks * CHUNK, **kw)
    assert result.num_compilations == 0, "the timed run recompiled"
    jax_md_ms.append(1e3 * statistics.median(result.chunk_times_s) / CHUNK)
    times = []
    for _ in range(chunks):
      t = time.perf_counter()
      dyn.run(CHUNK)
      times.append((time.perf_counter() - t) / CHUNK)
    ase_ms.append(1e3 * statistics.median(times))
  return (
    len(atoms),
    width,
    type(nbrs).__name__,
    int(nbrs.max_occupancy),
    min(bare),
    min(jax_md_ms),
    min(ase_ms),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--atoms", type=int, nargs="*", default=[256])
  parser.add_argument(
    "--small-atoms", type=int, default=32, help="atoms of the small-cell row (0: none)"
  )
  parser.add_argument("--chunks", type=int, default=3, help="timed 100-step chunks per round")
  parser.add_argument("--rounds", type=int, default=2, help="alternating bare/MD rounds")
  parser.add_argument("--repeats", type=int, default=20, help="bare calls per round")
  args = parser.parse_args()

  potential = potentials.Potential.create(0, species=["Cu"])
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{platform.processor() or platform.machine()}, float32, cutoff {potential.cutoff} Å, "
    f"skin {SKIN} Å, NVE, chunk {CHUNK}\n"
  )
  rows = []
  for n in args.atoms:
    atoms = fcc_copper(n)
    f, loop, R, nbrs = bare_fns(potential, atoms)
    kw = dict(
      ensemble="nve",
      temperature=300.0,
      timestep=1.0,
      chunk=CHUNK,
      dr_threshold=SKIN,
      capacity_multiplier=1.25,
    )
    t = time.perf_counter()
    warm = md.run(atoms, potential, total_steps=CHUNK, **kw)  # compiles the chunk once
    compile_s = time.perf_counter() - t
    bare, looped, step = [], [], []
    for _ in range(args.rounds):
      bare.append(median_time(lambda: f(R, nbrs), args.repeats))
      looped.append(median_time(lambda: loop(R), 1, LOOP))
      result = md.run(atoms, potential, total_steps=args.chunks * CHUNK, **kw)
      assert result.num_compilations == 0, "the timed run recompiled"
      step.append(statistics.median(result.chunk_times_s) / CHUNK)
    bare_ms, loop_ms, step_ms = 1e3 * min(bare), 1e3 * min(looped), 1e3 * min(step)
    rows.append(
      (
        len(atoms),
        int(nbrs.max_occupancy),
        bare_ms,
        loop_ms,
        step_ms,
        step_ms / bare_ms,
        step_ms / loop_ms,
        compile_s,
        warm.num_reallocations + result.num_reallocations,
      )
    )

  if rows:
    print(
      "| atoms | pair capacity | bare E+F (ms) | looped E+F (ms) | MD per step (ms) | "
      "ratio | ratio (loop) | first run incl. compile (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for n, cap, b, lp, s, r, rl, c, _ in rows:
    print(f"| {n} | {cap} | {b:.2f} | {lp:.2f} | {s:.2f} | {r:.2f} | {rl:.2f} | {c:.1f} |")
  if any(r[-1] for r in rows):
    print("\n(some runs reallocated their neighbour list; replays are included in the timing)")
  if args.small_atoms:
    n, width, kind, cap, bare, jm, ase_ms = small_cell_row(
      args.small_atoms, args.rounds, args.chunks, args.repeats
    )
    print(f"\nsmall cell, shipped copper model (cutoff {potentials.load('copper').cutoff} Å):\n")
    print(
      "| atoms | box width (Å) | JAX-MD list | pair capacity | bare E+F (ms) | "
      "JAX-MD per step (ms) | ASE engine per step (ms) | JAX-MD / ASE |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    print(
      f"| {n} | {width:.2f} | {kind} | {cap} | {bare:.2f} | {jm:.2f} | {ase_ms:.2f} | "
      f"{jm / ase_ms:.2f} |"
    )


if __name__ == "__main__":
  main()
