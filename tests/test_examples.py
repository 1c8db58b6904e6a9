"""Each script in examples/ runs with tiny settings and produces sane output.

With the shipped models (trained physics: bonds hold, the lattice constant is right) they
compile for minutes, so those runs are ``slow``; the ``_tiny`` variants run the same scripts on
the tiny stand-in models of conftest and check everything but the trained physics.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from ase.io import read

import potentials

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_main(name):
  return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")["main"]


@pytest.mark.slow
def test_ase_md_ethanol(tmp_path, capsys):
  out = tmp_path / "e.traj"
  summary = example_main("ase_md_ethanol")(
    ["--nvt-steps", "10", "--nve-steps", "40", "--log-every", "10", "--out", str(out)]
  )
  frames = read(out, ":")
  assert len(frames) == 2 + 5  # written at NVT steps 0, 10 and NVE steps 0, 10, ..., 40
  assert summary["compilations"] <= 1  # 0 if an earlier test compiled this model already
  assert summary["fluctuation_mev_atom"] < 1.0  # 0.5 fs velocity Verlet: ~0.03 meV/atom
  assert "NVE: drift" in capsys.readouterr().out


@pytest.mark.slow  # a learning run: about a minute
def test_learn_alloy(tmp_path, capsys):
  tiny = dict(cutoff=3.5, features=8, num_iterations=1, num_heads=1, num_basis=4)
  options = dict(max_labels=20, seed_labels=8, replicas=1, explore_ps=0.1, workers=1, model=tiny)
  out = example_main("learn_alloy")(
    ["--minutes", "1", "--out", str(tmp_path / "run"), "--md-ps", "0.2"]
    + ["--options", json.dumps(options)]
  )
  assert out["report"]["reference_calls"] <= 20 and out["report"]["rounds"]
  assert (tmp_path / "run" / "model.eqm").exists() and out["md"].total_steps == 100
  assert "reference calls, stopped:" in capsys.readouterr().out


def test_ase_md_ethanol_tiny(tiny_model_files, tmp_path, capsys):
  out = tmp_path / "e.traj"
  summary = example_main("ase_md_ethanol")(
    [
      "--model",
      tiny_model_files["ethanol"],
      "--nvt-steps",
      "10",
      "--nve-steps",
      "40",
      "--log-every",
      "10",
      "--dt",
      "0.25",
      "--out",
      str(out),
    ]
  )
  assert len(read(out, ":")) == 2 + 5
  assert summary["compilations"] <= 1 and np.isfinite(summary["fluctuation_mev_atom"])
  assert "NVE: drift" in capsys.readouterr().out


@pytest.mark.slow
def test_jax_md_ethanol(capsys):
  out = example_main("jax_md_ethanol")(["--nvt-steps", "20", "--nve-steps", "40", "--chunk", "10"])
  assert out["steps"] == 60
  R = out["final_positions"]
  assert np.all(np.isfinite(R))
  d = np.linalg.norm(R[:, None] - R[None], axis=-1) + 10 * np.eye(len(R))
  assert 0.8 < d.min() < 1.3  # bonded hydrogens stay bonded: the molecule is intact
  assert out["spread_mev_atom"] < 1.0  # NVE total energy: ~0.1 meV/atom at 0.5 fs
  assert "NVE t" in capsys.readouterr().out


def test_jax_md_ethanol_tiny(tiny_model_files, capsys):
  out = example_main("jax_md_ethanol")(
    [
      "--model",
      tiny_model_files["ethanol"],
      "--nvt-steps",
      "20",
      "--nve-steps",
      "40",
      "--chunk",
      "10",
      "--dt",
      "0.25",
    ]
  )
  assert out["steps"] == 60 and np.all(np.isfinite(out["final_positions"]))
  assert np.isfinite(out["spread_mev_atom"]) and "NVE t" in capsys.readouterr().out


@pytest.mark.slow
def test_jax_md_npt_copper(tmp_path):
  traj, log = tmp_path / "cu.traj", tmp_path / "cu.csv"
  out = example_main("jax_md_npt_copper")(["--steps", "20", "--out", str(traj), "--log", str(log)])
  assert 3.5 < out["lattice_constant"] < 3.75  # 20 steps of 2 fs barely move the box
  assert 150 < out["temperature"] < 900  # starts at 600 K on the lattice: equipartition halves it
  frames = read(traj, ":")
  assert len(frames[-1]) == 108 and frames[-1].info["md_step"] == 20
  assert log.read_text().count("\n") > 5


def test_jax_md_npt_copper_tiny(tiny_model_files, tmp_path):
  traj, log = tmp_path / "cu.traj", tmp_path / "cu.csv"
  out = example_main("jax_md_npt_copper")(
    ["--model", tiny_model_files["copper"], "--steps", "20", "--out", str(traj), "--log", str(log)]
  )
  assert 3.5 < out["lattice_constant"] < 3.75 and np.isfinite(out["temperature"])
  frames = read(traj, ":")
  assert len(frames[-1]) == 108 and frames[-1].info["md_step"] == 20
  assert log.read_text().count("\n") > 5


def test_train_own_model(tmp_path, capsys):
  model = tmp_path / "m.eqm"
  out = example_main("train_own_model")(
    ["--frames", "12", "--epochs", "4", "--features", "8", "--out", str(model)]
  )
  history = out["history"]
  assert len(history) == 4 and history[-1]["valid_loss"] < history[0]["valid_loss"]
  assert {"energy_per_atom_mae", "forces_mae", "stress_mae"} <= set(out["test"])
  pot = potentials.load(model)
  assert list(pot.symbols) == ["Cu"]
  assert (tmp_path / "my_data.extxyz").exists()
  assert "model written to" in capsys.readouterr().out


@pytest.mark.slow
def test_conservation_example_is_a_passing_pytest_file(tmp_path):
  run_conservation_example(tmp_path, EQATTN_PS="0.2", EQATTN_MAX_DRIFT="1.0")


def test_conservation_example_tiny(tiny_model_files, tmp_path):
  # A random tiny model heats ethanol to ~1300 K and drifts by a few meV/atom/ps: this run
  # checks the file and the fixture on both engines; the slow test above checks the physics.
  run_conservation_example(
    tmp_path, EQATTN_MODEL=tiny_model_files["ethanol"], EQATTN_PS="0.1", EQATTN_MAX_DRIFT="50"
  )


def run_conservation_example(tmp_path, **settings):
  env = dict(os.environ, **settings)
  # the child runs in tmp_path: import this checkout, not whichever eqattn is installed
  env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES.parent), env.get("PYTHONPATH", "")])
  cache = jax.config.values["jax_compilation_cache_dir"]
  if cache:  # the child shares this session's compilation cache (conftest)
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      str(EXAMPLES / "test_my_potential.py"),
      "-q",
      "-p",
      "no:cacheprovider",
      "--rootdir",
      str(tmp_path),
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "2 passed" in proc.stdout
