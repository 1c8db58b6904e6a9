"""The shipped models load by name and reproduce their recorded test accuracy."""

import pathlib

import pytest

import potentials
from potentials import training
from plugin.data import read_frames

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def test_shipped_models_listed():
  assert "ethanol" in potentials.shipped_models()


def test_ethanol_reproduces_recorded_test_mae():
  pot = potentials.load("ethanol")
  meta = pot.metadata
  recorded = meta["test_metrics"]
  assert recorded["forces_mae"] <= 0.025 and recorded["energy_mae"] <= 0.005  # issue targets
  cfg = training.TrainConfig(**meta["training"]["config"])
  frames = read_frames(str(DATA / "ethanol.extxyz.gz"), pot.cutoff)
  _, _, test_idx = training.split_frames(len(frames), cfg)
  assert len(test_idx) == meta["training"]["split"][2]
  sample = [frames[i] for i in test_idx[:48]]  # a slice of the held-out frames
  got = training.evaluate(pot, sample)
  # a 48-frame slice scatters around the full-set figure; a broken model is off by far more
  assert got["forces_mae"] == pytest.approx(recorded["forces_mae"], rel=0.25)
  assert got["energy_mae"] == pytest.approx(recorded["energy_mae"], rel=0.5)
  assert meta["provenance"]["command"] == "python data/train.py ethanol"
