"""Train the shipped models from the datasets in this folder.

    python data/train.py ethanol [--epochs N] [--checkpoint PATH]
    python data/train.py copper       (fine-tunes copper_v1, the earlier shipped model)
    python data/train.py copper_v1

Writes ``potentials/models/<name>.eqm`` (package data, loadable as ``potentials.load(name)``)
with the training provenance and test-set metrics inside the file. Training resumes from the
checkpoint if it exists (default ``out/<name>.ckpt``; ``out/<name>.stage<k>.ckpt`` for recipes
in stages, whose finished earlier stages are kept as ``out/<name>.stage<k>.eqm``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import potentials
from potentials import training
from plugin.data import read_frames

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# what every stage of both recipes shares (the time limit bounds the epochs)
STAGE = dict(epochs=2000, batch_size=8, forces_weight=1.0, split="trajectory", optimizer="amsgrad")
# ethanol's three stages (each on one core of the 2-core box)
ETHANOL_STAGE = dict(STAGE, energy_weight=1.0, stress_weight=0.0)

RECIPES = {
  "ethanol": dict(
    data="ethanol.extxyz.gz",
    species=["H", "C", "O"],
    # density features off (a molecule of fixed composition has no neighbour-count
    # problem); products and radial MLPs off, and L = 1 with 48 features instead of
    # L = 2 with 32: each trained better at equal time (benchmarks/training_ablation.py)
    model=dict(
      cutoff=5.0,
      features=48,
      max_degree=1,
      num_iterations=3,
      num_heads=2,
      num_basis=16,
      density_features=False,
      product=False,
    ),
    # amsgrad, batch 8: the best of benchmarks/training_ablation.py at equal time; in full
    # 30-minute runs (one core of the 2-core box) lr 1e-2 beat 5e-3 (held-out force MAE 9.9
    # vs 11.5 meV/Å) and energy weight 1 beat 10 (9.0 vs 10.1 meV/Å, energy 1.6 vs 1.9 meV)
    stages=[
      dict(ETHANOL_STAGE, time_limit=30.0, learning_rate=1e-2),
      # then slower, averaged descents from the stage before (as copper's stage 2): stage 2
      # took held-out force MAE 9.0 -> 5.6 meV/Å, the random-frame figure 9.8 -> 6.2
      dict(ETHANOL_STAGE, time_limit=75.0, learning_rate=2e-3, ema_decay=0.99),
      dict(ETHANOL_STAGE, time_limit=40.0, learning_rate=5e-4, ema_decay=0.99),
    ],
  ),
  "copper": dict(
    # copper_v1 fine-tuned on data/copper.extxyz.gz (whole held-out runs, a liquid, surfaces
    # and a vacancy at every temperature) in two stages; its weights are the start, so the 67
    # minutes it took are not paid again
    data="copper.extxyz.gz",
    species=["Cu"],
    init="copper_v1",
    stages=[
      # copper_v1's loss weights (shipped alone until 2026-12-03: held-out force MAE 7.14)
      dict(
        STAGE,
        time_limit=60.0,
        learning_rate=1e-3,
        energy_weight=100.0,
        stress_weight=0.1,
      ),
      # then forces first: the energy (0.27 meV/atom) and stress (0.10 meV/Å^3) errors were
      # 4-10x inside their targets, the force error just outside
      dict(
        STAGE,
        time_limit=65.0,
        learning_rate=5e-4,
        energy_weight=20.0,
        stress_weight=0.05,
        ema_decay=0.99,
      ),
    ],
  ),
  "copper_v1": dict(
    # the copper model shipped until December 2026 (potentials/models/copper_v1.eqm), the
    # starting point of "copper"; trained from scratch on data/copper_v1.extxyz.gz. This
    # architecture trained from scratch on data/copper.extxyz.gz with amsgrad, lr 5e-3 and the
    # trajectory split for 30 min on 2 cores (43 epochs) reached only 15.3 meV/Å on its
    # held-out runs, where copper_v1 has 7.8
    data="copper_v1.extxyz.gz",
    species=["Cu"],
    # 4.5 Å keeps 108-atom cells usable with JAX-MD (box >= 2 (cutoff + skin)) and a step
    # ~0.25 s on 2 cores; two blocks see 9 Å. Density features let it count neighbours
    # (surfaces, vacancy). Per-atom energy errors are ~100x smaller than force errors,
    # hence the energy weight; with stress weight 1 the stress term dominated the loss
    # at 10x below its target, so it gets 0.1.
    model=dict(
      cutoff=4.5,
      features=24,
      max_degree=2,
      num_iterations=2,
      num_heads=2,
      num_basis=16,
      density_features=True,
    ),
    # the shipped copper model predates held-out-trajectory splits and amsgrad
    train=dict(
      epochs=180,
      batch_size=8,
      learning_rate=2e-3,
      energy_weight=100.0,
      forces_weight=1.0,
      stress_weight=0.1,
      split="random",
      optimizer="adam",
    ),
  ),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("name", choices=sorted(RECIPES))
  ap.add_argument("--epochs", type=int, default=None)
  ap.add_argument("--time-limit", type=float, default=None, help="minutes (overrides recipe)")
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--out", default=None, help="model file (default: the package's models/)")
  args = ap.parse_args(argv)
  recipe = RECIPES[args.name]
  if "init" in recipe:  # fine-tune a trained model (its architecture and species)
    pot = potentials.load(recipe["init"])
  else:
    pot = potentials.Potential.create(0, species=recipe["species"], **recipe["model"])
  frames = read_frames(str(HERE / recipe["data"]), pot.cutoff)
  stages = recipe.get("stages") or [recipe["train"]]
  for k, stage in enumerate(stages, 1):
    last = k == len(stages)
    name = args.name if len(stages) == 1 else f"{args.name}.stage{k}"
    done = ROOT / "out" / f"{name}.eqm"
    if not last and done.exists():  # a finished earlier stage of an interrupted run
      pot = potentials.load(done)
      continue
    tcfg = dict(stage)
    if args.epochs:
      tcfg["epochs"] = args.epochs
    if args.time_limit:
      tcfg["time_limit"] = args.time_limit
    default_ckpt = ROOT / "out" / f"{name}.ckpt"
    ckpt = Path(args.checkpoint or default_ckpt) if len(stages) == 1 else default_ckpt
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    result = training.train(
      pot,
      frames,
      training.TrainConfig(**tcfg),
      checkpoint=str(ckpt),
      fine_tune="init" in recipe or k > 1,
      progress=sys.stderr.isatty(),
      log=lambda rec, k=k: print(json.dumps({"stage": k, **rec}), flush=True),
    )
    meta = dict(result.potential.metadata)
    meta["provenance"] = {
      "data": f"data/{recipe['data']}",
      "recipe": args.name,
      "command": f"python data/train.py {args.name}",
      **({"stage": f"{k} of {len(stages)}"} if len(stages) > 1 else {}),
    }
    pot = result.potential.replace(metadata=meta)
    out = (
      done if not last else Path(args.out or ROOT / "potentials" / "models" / f"{args.name}.eqm")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    pot.save(out)
    print(
      json.dumps(
        {"model": str(out), "seconds": result.seconds, "metrics": result.metrics}, indent=1
      )
    )


if __name__ == "__main__":
  main()
