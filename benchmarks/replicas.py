"""Many replicas in one program vs one replica alone: cost per replica-step.

For each system and batch size ``B``, ``plugin.md.run([atoms] * B, ...)`` (NVE, float32, the
shipped model, seeds 0..B-1) and ``plugin.md.run(atoms, ...)`` alone run the same number of
steps in chunks of 100 after a compiled warm-up run with the same settings; the time is the
driver's own (``MDResult.wall_time_s``, the chunks). Rounds alternate batched and alone runs and
the table keeps the fastest round of each, so machine load affects both alike.

``ratio = (batched time / (B * steps)) / (alone time / steps)``: the cost of one replica-step in
a batch relative to a step alone; the target is <= 1.0 (batching never costs more than running
the replicas one after the other). ``throughput`` is ``1 / ratio``.

    python benchmarks/replicas.py                    # ethanol B = 1, 8, 64; Cu108 B = 1, 4, 16
    python benchmarks/replicas.py --systems copper --batches 1 4 --steps 200
    python benchmarks/replicas.py --systems ethanol --batches 256 --steps 1000   # a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import ase.build
import jax
import numpy as np

import potentials
import plugin.md as md

SYSTEMS = {
  # name: (model, structure, timestep fs, default batch sizes)
  "ethanol": ("ethanol", lambda: ase.build.molecule("CH3CH2OH"), 0.5, (1, 8, 64)),
  "copper": (
    "copper",
    lambda: ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3),
    2.0,
    (1, 4, 16),
  ),
}


def timed(atoms, pot, steps: int, dt: float, batch: int) -> float:
  kw = dict(
    ensemble="nve", temperature=300.0, timestep=dt, total_steps=steps, chunk=100, dtype="float32"
  )
  if batch == 0:
    return md.run(atoms, pot, **kw).wall_time_s
  return md.run([atoms] * batch, pot, seed=0, **kw)[0].wall_time_s


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
  ap.add_argument("--batches", nargs="+", type=int, help="batch sizes (default per system)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--rounds", type=int, default=2)
  args = ap.parse_args(argv)
  print(
    f"# {platform.node()} {jax.devices()[0].device_kind} x{jax.device_count()}, "
    f"jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
  )
  print(
    "| system | atoms | B | alone (µs/step) | batched (µs/replica-step) | ratio | throughput (x) |"
  )
  print("|---|---|---|---|---|---|---|")
  for name in args.systems:
    model, build, dt, batches = SYSTEMS[name]
    pot, atoms = potentials.load(model), build()
    for b in args.batches or batches:
      timed(atoms, pot, 100, dt, 0)  # compile both (the engines are cached)
      timed(atoms, pot, 100, dt, b)
      alone, batched = np.inf, np.inf
      for _ in range(args.rounds):
        alone = min(alone, timed(atoms, pot, args.steps, dt, 0) / args.steps)
        batched = min(batched, timed(atoms, pot, args.steps, dt, b) / (b * args.steps))
      ratio = batched / alone
      print(
        f"| {name} | {len(atoms)} | {b} | {alone * 1e6:.0f} | {batched * 1e6:.1f} | "
        f"{ratio:.3f} | {1 / ratio:.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
