"""Uncertainty of eqattn ensembles: does the spread know where the model is wrong, and what
does it cost?

Trains, on the ethanol frames at 300-600 K only (the default held-out-trajectory split), a
shallow ensemble (``heads`` readout heads, with ``force_heads``: their force deviations read
out) and a committee (``members`` models, the budget shared), both with the shipped ethanol
recipe (data/train.py) and calibrated on the validation trajectories. The shallow ensemble
is measured twice: with its members' forces differentiated (one backward pass per head) and
read out (no extra backward pass); both share one network and its energies. Then, on
held-out trajectories in range (the test trajectories, 300-600 K) and out of range (every
800 K trajectory, a temperature no model saw):

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

# the shipped ethanol model's first stage (git show bdec809:data/train.py), with which the
# figures of docs/benchmarks.md were measured: the ensembles train from scratch for the
# minutes given
ETHANOL = dict(
  data="ethanol.extxyz.gz",
  species=["H", "C", "O"],
  model=dict(cutoff=5.0, density_features=False),  # ModelConfig()'s architecture otherwise
)
ETHANOL_TRAIN = dict(
  epochs=2000,
  batch_size=8,
  learning_rate=1e-2,
  energy_weight=1.0,
  forces_weight=1.0,
  stress_weight=0.0,
  optimizer="amsgrad",
  schedule="cosine",
  final_lr_fraction=0.01,
  ema_decay=0.0,
)

OUT_OF_RANGE_K = 800.0


def _train(frames, kind: str, k: int, minutes: float, log):
  recipe = ETHANOL
  model = dict(recipe["model"], heads=k if kind == "heads" else 1, force_heads=kind == "heads")
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


def _calls(pot, atoms):
  """``call()``: one E+F (+ uncertainty) call of a new structure, compiled beforehand."""
  atoms = atoms.copy()
  atoms.calc = Calculator(pot)
  atoms.get_forces()  # compile
  sign = [1.0]

  def call():
    sign[0] = -sign[0]
    atoms.positions[0, 0] += 1e-4 * sign[0]  # a new structure every call
    atoms.get_forces()

  return call


def _best_seconds(calls: dict, repeats: int, rounds: int = 5) -> dict:
  """Best time per call of each entry over ``rounds``, the entries taking turns within each
  round (side by side: drifts of a shared machine hit them alike)."""
  best = dict.fromkeys(calls, np.inf)
  for _ in range(rounds):
    for name, call in calls.items():
      t0 = time.perf_counter()
      for _ in range(repeats):
        call()
      best[name] = min(best[name], (time.perf_counter() - t0) / repeats)
  return best


def cost_table(k_heads: int, k_committee: int) -> list:
  """E+F (+ uncertainty) time per call relative to one model, side by side."""
  eth = ETHANOL
  molecule = ase.build.molecule("CH3CH2OH")
  copper = ase.build.bulk("Cu", cubic=True).repeat(4)
  copper.rattle(0.05, seed=0)
  rows = []
  for name, atoms, species, model, repeats in (
    ("ethanol (9 atoms)", molecule, eth["species"], eth["model"], 200),
    ("Cu fcc (256 atoms)", copper, ["Cu"], dict(eth["model"], density_features=True), 10),
  ):
    kinds = {
      "single": {},
      "heads": dict(readout_heads=k_heads),
      "readout": dict(heads=k_heads, force_heads=True),
      "committee": dict(committee=k_committee),
    }
    calls = {
      kind: _calls(potentials.Potential.create(0, species=species, **dict(model, **kw)), atoms)
      for kind, kw in kinds.items()
    }
    t = _best_seconds(calls, repeats)
    cells = [f"{t[k] * 1e3:.2f} ({t[k] / t['single']:.2f}x)" for k in list(kinds)[1:]]
    rows.append(f"| {name} | {t['single'] * 1e3:.2f} | " + " | ".join(cells) + " |")
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
  print(
    f"| system | one model (ms) | {args.heads} heads, forces differentiated | "
    f"{args.heads} heads, forces read out | committee of {args.members} |"
  )
  print("|---|---|---|---|---|")
  for row in cost_table(args.heads, args.members):
    print(row, flush=True)
  if args.cost_only:
    return
  recipe = ETHANOL
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
  rows = {
    "heads, forces read out": models["heads"],
    "heads, forces differentiated": training.calibrate(
      training.without_readout(models["heads"]), valid
    ),
    "committee": models["committee"],
  }
  for kind, pot in rows.items():
    if kind == "heads, forces read out" and not pot.config.force_heads:
      continue  # a file saved before force_heads
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
