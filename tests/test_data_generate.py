"""The copper dataset generator: runs are independent and reproducible (so the file does not
depend on ``--jobs``), and every (kind, temperature) has enough runs for whole-run hold-out."""

import importlib.util
import pathlib
from collections import Counter

import numpy as np

PATH = pathlib.Path(__file__).resolve().parents[1] / "data" / "generate.py"


def _generator():
  spec = importlib.util.spec_from_file_location("eqattn_data_generate", PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_copper_runs_allow_whole_run_hold_out():
  gen = _generator()
  runs = gen.copper_runs()
  per_stratum = Counter((kind, temp) for kind, temp, _ in runs if temp is not None)
  assert min(per_stratum.values()) >= 3  # 1 test, 1 validation, the rest train
  assert {kind for kind, _ in per_stratum} >= {"bulk_md", "vacancy", "liquid"}


def test_a_copper_run_depends_only_on_its_job():
  gen = _generator()
  job = (7, 3, "shear", None, 1)
  first, kinetic = gen.copper_run(job)
  _ = gen.copper_run((7, 4, "shear", None, 1))  # another job in between changes nothing
  again, _ = gen.copper_run(job)
  assert len(first) == gen.CU_STRAIN_FRAMES and len(kinetic["shear"]) == len(first)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.get_potential_energy() == b.get_potential_energy()
  assert {f.info["trajectory"] for f in first} == {"shear/1"}
