"""Train a model on your own labelled structures (any ASE-readable file: extxyz, ASE db, ...).

Each structure needs an energy and/or forces (stress too, for periodic cells, if you have it),
e.g. extxyz written by ``ase.io.write`` from Atoms with a calculator attached. Without a DATA
argument this example first makes such a file itself: rattled and strained copper cells
labelled with ASE's EMT calculator, standing in for your DFT data::

    python examples/train_own_model.py                          # makes my_data.extxyz, trains
    python examples/train_own_model.py mine.extxyz --species H C N O --epochs 200 --features 32

Then it trains (fixed-seed train/validation/test split, per-element shifts fitted first, best
validation parameters kept), prints the test MAE/RMSE, saves the model file and uses it in
ASE. The same is ``eqattn train DATA --species ...`` from the shell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

import potentials
from potentials import training
from plugin.ase import Calculator
from plugin.data import read_frames


def make_example_data(path: str, count: int, seed: int = 0) -> None:
  """``count`` labelled Cu structures (energy, forces, stress) written to ``path`` as extxyz."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(count):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)  # 32 atoms
    strain = np.eye(3) + rng.normal(scale=0.02, size=(3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(stdev=0.08, seed=int(rng.integers(1 << 31)))
    atoms.calc = EMT()
    labels = dict(
      energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress()
    )
    atoms.calc = SinglePointCalculator(atoms, **labels)  # labels travel with the structure
    images.append(atoms)
  write(path, images, format="extxyz")


def main(argv: Optional[List[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("data", nargs="?", help="labelled structures (default: make my_data.extxyz)")
  ap.add_argument("--species", nargs="+", default=["Cu"], help="elements the model knows")
  ap.add_argument("--frames", type=int, default=60, help="structures to make without DATA")
  ap.add_argument("--cutoff", type=float, default=4.0, help="Å")
  ap.add_argument("--features", type=int, default=32)
  ap.add_argument("--max-degree", type=int, default=1)
  ap.add_argument("--iterations", type=int, default=1)
  ap.add_argument("--epochs", type=int, default=60)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--out", default="my_model.eqm")
  ap.add_argument("--checkpoint", default=None, help="resumable checkpoint file")
  args = ap.parse_args(argv)

  data = args.data
  if data is None:
    data = str(Path(args.out).with_name("my_data.extxyz"))
    make_example_data(data, args.frames)
    print(f"wrote {args.frames} EMT-labelled Cu structures to {data}")

  pot = potentials.Potential.create(
    0,
    species=args.species,
    cutoff=args.cutoff,
    features=args.features,
    max_degree=args.max_degree,
    num_iterations=args.iterations,
  )
  frames = read_frames(data, pot.cutoff)
  config = training.TrainConfig(
    epochs=args.epochs,
    batch_size=args.batch_size,
    learning_rate=5e-3,
    energy_weight=10.0,
    forces_weight=1.0,
    stress_weight=1.0,
  )
  result = training.train(
    pot, frames, config, checkpoint=args.checkpoint, progress=sys.stderr.isatty()
  )
  model = result.potential.replace(
    metadata={**result.potential.metadata, "provenance": {"data": data}}
  )
  model.save(args.out)

  test = result.metrics["test"]
  print(
    f"trained {args.epochs} epochs on {len(frames)} structures in {result.seconds:.1f} s; test set:"
  )
  for key, unit, scale in (
    ("energy_per_atom", "meV/atom", 1e3),
    ("forces", "meV/Å", 1e3),
    ("stress", "meV/Å³", 1e3),
  ):
    if f"{key}_mae" in test:
      print(
        f"  {key:16s} MAE {test[key + '_mae'] * scale:8.3f}  "
        f"RMSE {test[key + '_rmse'] * scale:8.3f} {unit}"
      )

  # The saved file is a complete model: load it and use it like a shipped one.
  from ase.io import read

  atoms = read(data, index=0)
  atoms.calc = Calculator(potentials.load(args.out))
  print(
    f"model written to {args.out}; first structure: E = {atoms.get_potential_energy():.4f} "
    f"eV (reference {read(data, index=0).get_potential_energy():.4f} eV)"
  )
  return {"test": test, "out": args.out, "history": result.history}


if __name__ == "__main__":
  main()
