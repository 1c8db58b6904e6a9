"""Misbehaving references for tests/test_learn_labels.py, named as ``tests.learn_refs:NAME``
specs so that spawned label workers import them.

Each is EMT that misbehaves on frames whose ``info["bad"]`` is true, the way a real reference
does: an exception (SCF not converged), NaN, a hang, or the process dying."""

import os
import time

import numpy as np
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT


class _Flaky(EMT):
  def __init__(self, mode: str):
    super().__init__()
    self.mode = mode

  def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
    if atoms.info.get("bad"):
      if self.mode == "raise":
        raise RuntimeError("SCF not converged in 250 iterations")
      if self.mode == "sleep":
        time.sleep(60)
      if self.mode == "exit":
        os._exit(1)
    super().calculate(atoms, properties, system_changes)
    if atoms.info.get("bad") and self.mode == "nan":
      self.results["forces"] = np.full_like(self.results["forces"], np.nan)


def raising():
  return _Flaky("raise")


def nan():
  return _Flaky("nan")


def sleeping():
  return _Flaky("sleep")


def exiting():
  return _Flaky("exit")


class _NeedsSpin(EMT):
  """Refuses a lone atom of odd Z unless it has one unpaired electron (initial magmom 1)."""

  def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
    if len(atoms) == 1 and atoms.numbers[0] % 2 and atoms.get_initial_magnetic_moments().sum() != 1:
      raise RuntimeError("odd electron count needs uhf=1")
    super().calculate(atoms, properties, system_changes)


def needs_spin():
  return _NeedsSpin()


def broken():
  raise ImportError("libdft.so: cannot open shared object file")


def not_a_calculator():
  return object()


NOT_CALLABLE = 3
