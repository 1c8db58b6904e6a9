"""A batch whose replicas leave one after another, run by two models of one shape.

Active learning's exploration (``plugin.learn.explore``) runs replicas of one molecule over a
ladder of temperatures, on a new model every round; hot replicas trip their guards at
different steps. This measures what that costs: 8 replicas of the start structure at 300-800 K
(NVT Langevin, 0.5 fs, ``--steps`` steps in chunks of 50) with ``max_temperature`` 1000 K, so
that the hotter ones leave at different chunks; then the same batch with a second model of
the same shape (the parameters scaled by 1.001, as a retrained round's would differ). Reported
per model: wall seconds of the call (compilation included), compilations, replicas that left
and at which steps::

    python benchmarks/batch_departures.py --model out/learn/glycine2/learn/model.eqm \\
        --system glycine --json out/departures.json

Run it on two commits (a copy of each tree on ``PYTHONPATH``) to compare them.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import jax

import potentials
from plugin import md
from provenance import provenance

TEMPERATURES = (300.0, 400.0, 500.0, 600.0, 650.0, 700.0, 750.0, 800.0)


def start_structure(name: str):
  import ase.build

  if name == "glycine":
    from learn import start_structure as learn_start

    return learn_start("glycine")
  return ase.build.molecule(name)


def one(potential, atoms, steps: int) -> dict:
  t0 = time.perf_counter()
  with warnings.catch_warnings():  # each departure warns; counted below instead
    warnings.simplefilter("ignore", RuntimeWarning)
    res = md.run(
      [atoms] * len(TEMPERATURES), potential, ensemble="nvt_langevin",
      temperature=list(TEMPERATURES), seed=0, timestep=0.5, total_steps=steps, chunk=50,
      max_temperature=1000.0,
    )  # fmt: skip
  return {
    "seconds": round(time.perf_counter() - t0, 1),
    "compilations": max(r.num_compilations for r in res),
    "left_at_steps": [r.total_steps for r in res if r.stopped],
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="ethanol", help="a model file or a shipped name")
  ap.add_argument("--system", default="CH3CH2OH", help="'glycine' or an ase.build.molecule name")
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--json")
  args = ap.parse_args()
  first = potentials.load(args.model)
  second = first.replace(params=jax.tree.map(lambda x: 1.001 * x, first.params))
  atoms = start_structure(args.system)
  out = {
    "first_model": one(first, atoms, args.steps),
    "second_model": one(second, atoms, args.steps),
    "settings": vars(args) | {"temperatures": TEMPERATURES},
    "provenance": provenance(),
  }
  text = json.dumps(out, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
