"""Training ablations at equal wall time: which recipe and architecture changes pay off.

Each variant trains the same starting model on the same data for the same wall-clock budget
(``TrainConfig.time_limit``), with the default held-out-trajectory split, and reports the
validation and test force/energy MAE on whole trajectories that no training frame came from.
Each variant changes the base recipe as its name says ("+" joins changes).

    python benchmarks/training_ablation.py                        # ethanol, 6 min per variant
    python benchmarks/training_ablation.py --minutes 3 --only base ema
    python benchmarks/training_ablation.py --data data/copper.extxyz.gz --species Cu

Run it pinned to one core (``taskset -c 0``) when the machine is shared, so every variant
gets the same compute.
"""

from __future__ import annotations

import argparse
import json
import time

import potentials
from potentials import training
from plugin.data import read_frames

BASE_MODEL = dict(
  cutoff=5.0,
  features=32,
  max_degree=2,
  num_iterations=3,
  num_heads=2,
  num_basis=16,
  density_features=False,
  product=False,
)
# the recipe of the models shipped before this benchmark existed
BASE_TRAIN = dict(
  epochs=10_000,
  batch_size=16,
  learning_rate=2e-3,
  energy_weight=10.0,
  forces_weight=1.0,
  stress_weight=0.0,
  optimizer="adam",
  ema_decay=0.0,
  loss="mse",
)

SHIPPED = {"optimizer": "amsgrad", "batch_size": 8}
# name -> (model changes, training changes), each relative to BASE_*
VARIANTS = [
  ("base", {}, {}),
  ("ema", {}, {"ema_decay": 0.99}),
  ("amsgrad", {}, {"optimizer": "amsgrad"}),
  ("product", {"product": True}, {}),
  ("late_energy", {}, {"late_energy_weight": 100.0}),
  ("amsgrad+huber", {}, {"optimizer": "amsgrad", "loss": "huber"}),
  ("amsgrad+lr5e-3", {}, {"optimizer": "amsgrad", "learning_rate": 5e-3}),
  ("amsgrad+batch8", {}, {"optimizer": "amsgrad", "batch_size": 8}),
  # from the shipped ethanol recipe (amsgrad, batch 8: data/train.py)
  ("shipped", {}, SHIPPED),
  ("shipped+lr5e-3", {}, {**SHIPPED, "learning_rate": 5e-3}),
  ("shipped+L1F48", {"max_degree": 1, "features": 48}, SHIPPED),
  ("shipped+product", {"product": True}, SHIPPED),
  ("shipped+heads4", {"num_heads": 4}, SHIPPED),
  ("shipped+E1", {}, {**SHIPPED, "energy_weight": 1.0}),
  ("shipped+radial32", {"radial_mlp": 32}, SHIPPED),
  ("shipped+lr1e-2", {}, {**SHIPPED, "learning_rate": 1e-2}),
  ("shipped+lr5e-3+radial32", {"radial_mlp": 32}, {**SHIPPED, "learning_rate": 5e-3}),
  ("shipped+lr5e-3+L1F48", {"max_degree": 1, "features": 48}, {**SHIPPED, "learning_rate": 5e-3}),
]


def run(frames, species, model, train, minutes, seed=0):
  pot = potentials.Potential.create(seed, species=species, **model)
  cfg = training.TrainConfig(**{**train, "time_limit": minutes})
  t0 = time.perf_counter()
  res = training.train(pot, frames, cfg, progress=False)
  return res, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default="data/ethanol.extxyz.gz")
  ap.add_argument("--species", nargs="+", default=["H", "C", "O"])
  ap.add_argument("--minutes", type=float, default=6.0, help="training budget per variant")
  ap.add_argument("--only", nargs="+", help="run only these variants")
  ap.add_argument("--json", help="also write the rows to this JSON file")
  args = ap.parse_args(argv)
  frames = read_frames(args.data, BASE_MODEL["cutoff"])
  rows = []
  print(
    "| variant | epochs | valid F MAE (meV/Å) | test F MAE (meV/Å) | test E MAE (meV) "
    "| test E MAE (meV/atom) |"
  )
  print("|---|---|---|---|---|---|")
  for name, dm, dt in VARIANTS:
    if args.only and name not in args.only:
      continue
    model, train = {**BASE_MODEL, **dm}, {**BASE_TRAIN, **dt}
    res, wall = run(frames, args.species, model, train, args.minutes)
    v, t = res.metrics["valid"], res.metrics["test"]
    row = {
      "variant": name,
      "epochs": len(res.history),
      "wall_s": wall,
      "valid": v,
      "test": t,
      "model": dict(model),
      "train": dict(train),
    }
    rows.append(row)
    print(
      f"| {name} | {row['epochs']} | {v['forces_mae'] * 1e3:.2f} | "
      f"{t['forces_mae'] * 1e3:.2f} | {t['energy_mae'] * 1e3:.2f} | "
      f"{t['energy_per_atom_mae'] * 1e3:.3f} |",
      flush=True,
    )
    if args.json:
      with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
