"""Train the shipped models from the datasets in this folder: each is one ``eqattn train`` call.

    python data/train.py ethanol [--time-limit MINUTES] [--out PATH] [--checkpoint PATH]
    python data/train.py copper       (fine-tunes copper_v1, the earlier shipped model)
    python data/train.py copper_v1
    python data/train.py ethanol --print      (the command only)

The recipe is ``eqattn train``'s own (``TrainConfig()``: a wall-clock budget, an exponential
learning-rate decay, an average of the weights), so a recipe here names only the data, the
species, the architecture where it is not the default, and the budget. Writes
``potentials/models/<name>.eqm`` by default, with provenance and held-out metrics inside;
training resumes from its checkpoint (default ``out/<name>.ckpt``) with the time it had left.

The model files shipped in ``potentials/models`` were made before this recipe moved into
``eqattn train``, by the staged script of commit bdec809 (``git show bdec809:data/train.py``:
ethanol in three learning-rate stages, copper in two); their provenance says so.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from plugin import cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RECIPES = {
  # density features off: a molecule of fixed composition has no neighbour-count problem;
  # 145 minutes, the staged recipe's total
  "ethanol": [
    "ethanol.extxyz.gz",
    *("--species", "H", "C", "O"),
    *("--model-config", '{"density_features": false}'),
    *("--time-limit", "145"),
  ],
  # copper_v1's weights are the start (its 67 minutes are not paid again); per-atom energies
  # of periodic cells weigh more for a material than for a molecule
  "copper": [
    "copper.extxyz.gz",
    *("--init", "copper_v1"),
    *("--lr", "1e-3"),
    *("--train-config", '{"energy_weight": 20, "stress_weight": 0.05}'),
    *("--time-limit", "125"),
  ],
  # the copper model shipped until December 2026, the start of "copper": 4.5 Å keeps 108-atom
  # cells usable with JAX-MD; it predates held-out-trajectory splits, amsgrad and the budget
  "copper_v1": [
    "copper_v1.extxyz.gz",
    *("--species", "Cu", "--cutoff", "4.5"),
    *("--model-config", '{"features": 24, "max_degree": 2, "num_iterations": 2}'),
    *("--epochs", "180", "--split", "random", "--lr", "2e-3"),
    "--train-config",
    '{"energy_weight": 100, "forces_weight": 1, "stress_weight": 0.1, "optimizer": "adam", '
    '"schedule": "cosine", "final_lr_fraction": 0.01, "ema_decay": 0}',
  ],
}


def command(name: str, out: Path, checkpoint: Path, time_limit=None) -> list:
  """The ``eqattn train`` arguments of recipe ``name``."""
  data, *options = RECIPES[name]
  if time_limit is not None:
    options += ["--time-limit", f"{time_limit:g}"]  # the last one given wins
  # --force: the recipe's purpose is to replace the model file it names
  out_args = ["--out", str(out), "--force", "--checkpoint", str(checkpoint)]
  return ["train", str(HERE / data), *options, *out_args]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("name", choices=sorted(RECIPES))
  ap.add_argument("--time-limit", type=float, help="minutes (overrides the recipe's)")
  ap.add_argument("--checkpoint", help="default: out/NAME.ckpt")
  ap.add_argument("--out", help="model file (default: the package's models/NAME.eqm)")
  ap.add_argument("--print", action="store_true", help="print the eqattn command, run nothing")
  args = ap.parse_args(argv)
  out = Path(args.out or ROOT / "potentials" / "models" / f"{args.name}.eqm")
  ckpt = Path(args.checkpoint or ROOT / "out" / f"{args.name}.ckpt")
  argv = command(args.name, out, ckpt, args.time_limit)
  print("eqattn " + shlex.join(argv), flush=True)
  if args.print:
    return 0
  ckpt.parent.mkdir(parents=True, exist_ok=True)
  return cli.main(argv)


if __name__ == "__main__":
  sys.exit(main())
