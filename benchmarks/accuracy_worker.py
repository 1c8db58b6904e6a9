"""Predictions and E+F timing through any ASE calculator, for ``benchmarks/accuracy.py``.

The driver imports it to evaluate eqattn, and the MACE venv's Python runs it as a script, so
both models are measured by the same code on the same files. As a script it needs only numpy,
ase, torch and mace-torch (no jax, no eqattn); torch is held to one thread first.

    PY accuracy_worker.py train CLOCK.json ARGS...   mace_run_train with ARGS (MACE's own
                                            options); CPU seconds at each epoch to CLOCK.json
    PY accuracy_worker.py evaluate MODEL OUT.json TIMING.xyz PART.xyz...
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def predict_file(calc, path) -> dict:
  """Energies (eV) and forces (eV/Å) of every structure in an extxyz file."""
  import ase.io

  energies, forces = [], []
  for atoms in ase.io.read(path, ":"):
    atoms.calc = calc
    energies.append(float(atoms.get_potential_energy()))
    forces.append(np.asarray(atoms.get_forces(), float).tolist())
  return {"energy": energies, "forces": forces}


def time_calls(calc, atoms, repeats: int, warmup: int = 3) -> dict:
  """Median CPU and wall seconds of one E+F call; positions jitter each call, so nothing is
  served from a cached result and the neighbour list is rebuilt, as in MD."""
  rng = np.random.default_rng(0)
  base = atoms.positions.copy()
  atoms.calc = calc
  cpu, wall = [], []
  for k in range(warmup + repeats):
    atoms.positions = base + rng.normal(scale=1e-3, size=base.shape)
    c0, w0 = time.process_time(), time.perf_counter()
    atoms.get_forces()
    if k >= warmup:
      cpu.append(time.process_time() - c0)
      wall.append(time.perf_counter() - w0)
  return {
    "atoms": len(atoms),
    "calls": repeats,
    "cpu_s": float(np.median(cpu)),
    "wall_s": float(np.median(wall)),
  }


def timing_repeats(num_atoms: int) -> int:
  """Fewer calls for bigger structures (about the same time per structure)."""
  return max(5, 180 // num_atoms)


def measure(calc, timing_path, part_paths) -> dict:
  import ase.io

  return {
    "predictions": {p: predict_file(calc, p) for p in part_paths},
    "timing": [time_calls(calc, a, timing_repeats(len(a))) for a in ase.io.read(timing_path, ":")],
  }


def _one_thread():
  import torch

  torch.set_num_threads(1)
  torch.set_num_interop_threads(1)


class _EpochClock:
  """A logging handler that notes this process's CPU seconds at each of MACE's validation
  reports ("Initial: ..." and "Epoch N: ..."), so a short run measures CPU per epoch."""

  def __init__(self, path):
    import logging

    self.path, self.stamps = path, []
    handler = logging.Handler()
    handler.emit = self._emit
    logging.getLogger().addHandler(handler)

  def _emit(self, record):
    msg = record.getMessage()
    if "loss=" in msg and (msg.startswith("Initial") or msg.startswith("Epoch")):
      self.stamps.append(time.process_time())
      with open(self.path, "w") as fh:
        json.dump(self.stamps, fh)


def _train(args):
  _one_thread()
  clock, args = args[0], args[1:]
  _EpochClock(clock)
  from mace.cli.run_train import main

  sys.argv = ["mace_run_train", *args]
  main()


def _evaluate(args):
  _one_thread()
  import mace
  from mace.calculators import MACECalculator

  model, out, timing, parts = args[0], args[1], args[2], args[3:]
  calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float32")
  result = measure(calc, timing, parts)
  result["version"] = getattr(mace, "__version__", "unknown")
  with open(out, "w") as fh:
    json.dump(result, fh)


if __name__ == "__main__":
  {"train": _train, "evaluate": _evaluate}[sys.argv[1]](sys.argv[2:])
