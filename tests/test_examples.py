"""Each script in examples/ runs with tiny settings and produces sane output."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.io import read

import potentials

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_main(name):
  return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")["main"]


def test_ase_md_ethanol(tmp_path, capsys):
  out = tmp_path / "e.traj"
  summary = example_main("ase_md_ethanol")(
      ["--nvt-steps", "10", "--nve-steps", "40", "--log-every", "10", "--out", str(out)])
  frames = read(out, ":")
  assert len(frames) == 2 + 5  # written at NVT steps 0, 10 and NVE steps 0, 10, ..., 40
  assert summary["compilations"] <= 1  # 0 if an earlier test compiled this model already
  assert summary["fluctuation_mev_atom"] < 1.0  # 0.5 fs velocity Verlet: ~0.03 meV/atom
  assert "NVE: drift" in capsys.readouterr().out


def test_jax_md_ethanol(capsys):
  out = example_main("jax_md_ethanol")(
      ["--nvt-steps", "20", "--nve-steps", "40", "--chunk", "10"])
  assert out["steps"] == 60
  R = out["final_positions"]
  assert np.all(np.isfinite(R))
  d = np.linalg.norm(R[:, None] - R[None], axis=-1) + 10 * np.eye(len(R))
  assert 0.8 < d.min() < 1.3  # bonded hydrogens stay bonded: the molecule is intact
  assert out["spread_mev_atom"] < 1.0  # NVE total energy: ~0.1 meV/atom at 0.5 fs
  assert "NVE t" in capsys.readouterr().out


def test_jax_md_npt_copper(tmp_path):
  traj, log = tmp_path / "cu.traj", tmp_path / "cu.csv"
  out = example_main("jax_md_npt_copper")(
      ["--steps", "20", "--out", str(traj), "--log", str(log)])
  assert 3.5 < out["lattice_constant"] < 3.75  # 20 steps of 2 fs barely move the box
  assert 150 < out["temperature"] < 900  # starts at 600 K on the lattice: equipartition halves it
  frames = read(traj, ":")
  assert len(frames[-1]) == 108 and frames[-1].info["md_step"] == 20
  assert log.read_text().count("\n") > 5


def test_train_own_model(tmp_path, capsys):
  model = tmp_path / "m.eqm"
  out = example_main("train_own_model")(
      ["--frames", "12", "--epochs", "4", "--features", "8", "--out", str(model)])
  history = out["history"]
  assert len(history) == 4 and history[-1]["valid_loss"] < history[0]["valid_loss"]
  assert {"energy_per_atom_mae", "forces_mae", "stress_mae"} <= set(out["test"])
  pot = potentials.load(model)
  assert list(pot.symbols) == ["Cu"]
  assert (tmp_path / "my_data.extxyz").exists()
  assert "model written to" in capsys.readouterr().out


def test_conservation_example_is_a_passing_pytest_file(tmp_path):
  env = dict(os.environ, EQATTN_PS="0.2", EQATTN_MAX_DRIFT="1.0")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", str(EXAMPLES / "test_my_potential.py"), "-q",
       "-p", "no:cacheprovider", "--rootdir", str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "2 passed" in proc.stdout

