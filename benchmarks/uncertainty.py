"""Uncertainty of eqattn ensembles: does the spread know where the model is wrong, and what
does it cost?

Trains, on the ethanol frames at 300-600 K only (the default held-out-trajectory split), a
shallow ensemble (``heads`` readout heads) and a committee (``members`` models, the budget
shared), both with the shipped ethanol recipe (data/train.py) and calibrated on the
validation trajectories. Then, on held-out trajectories in range (the test trajectories,
300-600 K) and out of range (every 800 K trajectory, a temperature no model saw):

* Spearman rank correlation per frame between the mean predicted force uncertainty and the
  force RMSE (target >= 0.6), and the fraction of force components within one predicted
  sigma (68 % when calibrated);
* the cost of one E+F call with uncertainty (``plugin.ase.Calculator``) relative to one
  model of the same architecture, side by side on ethanol and on a 256-atom copper cell.

    python benchmarks/uncertainty.py                 # 20 minutes per ensemble
    python benchmarks/uncertainty.py --minutes 3 --json out/uncertainty.json
    python benchmarks/uncertainty.py --cost-only     # only the cost table (untrained models)
    python benchmarks/uncertainty.py --load out/unc  # measure ensembles saved by --save

Run it pinned to one core (``taskset -c 0``) when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ase.build
import numpy as np

import potentials
from potentials import training
from plugin.ase import Calculator
from plugin.data import read_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from train import RECIPES  # noqa: E402  (the shipped ethanol recipe)

# its first stage: the ensembles train from scratch for the minutes given
ETHANOL_TRAIN = RECIPES["ethanol"]["stages"][0]

OUT_OF_RANGE_K = 800.0


def _train(frames, kind: str, k: int, minutes: float, log):
  recipe = RECIPES["ethanol"]
  model = dict(recipe["model"], heads=k if kind == "heads" else 1)
  pot = potentials.Potential.create(0, species=recipe["species"], **model)
  cfg = training.TrainConfig(**{**ETHANOL_TRAIN, "time_limit": minutes})
  if kind == "heads":
    return training.train(pot, frames, cfg, progress=False, log=log).potential
  return training.train_committee(pot, frames, cfg, members=k, progress=False, log=log).potential


def _row(name, pot, sets):
  cells = [name, str(pot.num_members)]
  for frames in sets.values():
    m = training.uncertainty_metrics(pot, frames)
    cells += [
      f"{m['forces_rmse'] * 1e3:.1f}",
      f"{m['forces_sigma_mean'] * 1e3:.1f}",
      f"{m['forces_spearman']:.2f}",
      f"{100 * m['forces_within_1sigma']:.0f} %",
    ]
  return "| " + " | ".join(cells) + " |"


def _call_seconds(pot, atoms, repeats: int) -> float:
  atoms = atoms.copy()
  atoms.calc = Calculator(pot)
  atoms.get_forces()  # compile
  best = np.inf
  for _ in range(3):
    t0 = time.perf_counter()
    for i in range(repeats):
      atoms.positions[0, 0] += 1e-4 * (-1) ** i  # a new structure every call
      atoms.get_forces()
    best = min(best, (time.perf_counter() - t0) / repeats)
  return best


def cost_table(k_heads: int, k_committee: int) -> list:
  """E+F (+ uncertainty) time per call relative to one model, side by side."""
  eth = RECIPES["ethanol"]
  molecule = ase.build.molecule("CH3CH2OH")
  copper = ase.build.bulk("Cu", cubic=True).repeat(4)
  copper.rattle(0.05, seed=0)
  rows = []
  for name, atoms, species, model, repeats in (
    ("ethanol (9 atoms)", molecule, eth["species"], eth["model"], 200),
    ("Cu fcc (256 atoms)", copper, ["Cu"], dict(eth["model"], density_features=True), 10),
  ):
    single = potentials.Potential.create(0, species=species, **model)
    heads = potentials.Potential.create(0, species=species, **dict(model, heads=k_heads))
    committee = potentials.Potential.create(
      0, species=species, **dict(model, committee=k_committee)
    )
    t1 = _call_seconds(single, atoms, repeats)
    th = _call_seconds(heads, atoms, repeats)
    tc = _call_seconds(committee, atoms, repeats)
    rows.append(
      f"| {name} | {t1 * 1e3:.2f} | {th * 1e3:.2f} ({th / t1:.2f}x) | "
      f"{tc * 1e3:.2f} ({tc / t1:.2f}x) |"
    )
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--minutes", type=float, default=20.0, help="training budget per ensemble")
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--members", type=int, default=3)
  ap.add_argument("--cost-only", action="store_true")
  ap.add_argument("--save", help="folder for the two trained ensembles (.eqm)")
  ap.add_argument(
    "--load", help="folder of --save: measure those ensembles (calibrated again) instead"
  )
  ap.add_argument("--json", help="also write the measures to this JSON file")
  args = ap.parse_args(argv)
  print(f"| system | one model (ms) | {args.heads} heads | committee of {args.members} |")
  print("|---|---|---|---|")
  for row in cost_table(args.heads, args.members):
    print(row, flush=True)
  if args.cost_only:
    return
  recipe = RECIPES["ethanol"]
  here = Path(__file__).resolve().parents[1] / "data"
  frames = read_frames(str(here / recipe["data"]), recipe["model"]["cutoff"])
  hot = [f for f in frames if f.temperature == OUT_OF_RANGE_K]
  frames = [f for f in frames if f.temperature != OUT_OF_RANGE_K]
  cfg = training.TrainConfig(**ETHANOL_TRAIN)
  test = [frames[i] for i in training.split_parts(frames, cfg)["test"]]
  sets = {"held-out 300-600 K": test, f"{OUT_OF_RANGE_K:g} K (out of range)": hot}
  log = lambda rec: print(json.dumps(rec), file=sys.stderr, flush=True)
  valid = [frames[i] for i in training.split_parts(frames, cfg)["valid"]]
  models = {}
  for kind, k in (("heads", args.heads), ("committee", args.members)):
    if args.load:
      models[kind] = training.calibrate(
        potentials.load(Path(args.load) / f"ethanol_{kind}{k}.eqm"), valid
      )
      continue
    models[kind] = _train(frames, kind, k, args.minutes, log)
    if args.save:
      Path(args.save).mkdir(parents=True, exist_ok=True)
      models[kind].save(Path(args.save) / f"ethanol_{kind}{k}.eqm")
  head = " | ".join(f"{s}: F RMSE, σ mean (meV/Å), Spearman, within 1σ" for s in sets)
  print(f"\n| ensemble | members | {head} |")
  print("|---|---|" + "---|" * 4 * len(sets))
  out = {}
  for kind, pot in models.items():
    print(_row(f"{kind} ({args.minutes:g} min)", pot, sets), flush=True)
    out[kind] = {
      "calibration": pot.metadata.get("uncertainty"),
      **{s: training.uncertainty_metrics(pot, fr) for s, fr in sets.items()},
    }
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
