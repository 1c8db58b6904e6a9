import json
import os

import pathlib
from pathlib import Path

import re
import time

import numpy as np

import pytest
from ase.build import molecule
from ase.io import read, write

import potentials
from plugin import cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("models") / "tiny.eqm"
  pot = potentials.Potential.create(
    0,
    species=["H", "C", "O"],
    cutoff=3.0,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=2,
    num_basis=4,
  )
  pot.replace(params={**pot.params, "scale": np.full(3, 5.0, np.float32)}).save(path)
  return str(path)


DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def test_info(tiny_model, capsys):
  assert cli.main(["info", tiny_model, "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["species"] == ["H", "C", "O"] and info["cutoff_A"] == 3.0
  # without --json: a few lines, errors in meV
  assert cli.main(["info", "ethanol"]) == 0
  text = capsys.readouterr().out.splitlines()
  assert len(text) <= 6 and text[0].startswith("ethanol: H C O, cutoff 5 Å")
  assert "held-out trajectories: forces MAE 5.1 meV/Å" in text[2]
  assert "stage 3 of 3" in text[1] and text[-1] == "(all fields: eqattn info --json)"


def test_md_ase_engine_writes_trajectory_and_plot(tiny_model, tmp_path, capsys):
  traj, png = tmp_path / "run.traj", tmp_path / "run.png"
  assert (
    cli.main(
      [
        "md",
        "--model",
        tiny_model,
        "--engine",
        "ase",
        "--ensemble",
        "nve",
        "--steps",
        "40",
        "--dt",
        "0.25",
        "--out",
        str(traj),
        "--plot",
        str(png),
        "--log-interval",
        "5",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "steps/s" in out and "drift" in out
  frames = read(traj, ":")
  assert [f.info["md_step"] for f in frames] == list(range(0, 41, 5))
  assert frames[-1].get_chemical_formula() == "C2H6O"
  with open(traj.with_suffix(".csv")) as f:  # the same CSV log as the JAX-MD engine's
    assert [int(float(r.split(",")[0])) for r in f.read().splitlines()[1:]] == list(range(0, 41, 5))
  assert png.stat().st_size > 5000


def test_eval_prints_table(tiny_model, tmp_path, capsys):
  assert cli.main(["eval", tiny_model, str(DATA / "ethanol.extxyz.gz"), "--index", ":5"]) == 0
  out = capsys.readouterr().out
  assert "| all | 5 |" in out and "5 frames" in out and "forces MAE" in out


def test_check_conservation(tiny_model, tmp_path, capsys):
  xyz = tmp_path / "eth.xyz"
  write(xyz, molecule("CH3CH2OH"))
  assert (
    cli.main(["check-conservation", tiny_model, str(xyz), "--time", "0.05", "--dt", "0.25"]) == 0
  )
  assert "meV/atom/ps" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv,message",
  [
    (["info", "no_such_model"], "no shipped model"),
    (["md", "missing.xyz", "--model", "TINY"], "does not exist"),
    (["md", "--model", "TINY", "--ensemble", "npt"], "needs a periodic"),
    (["eval", "TINY", "missing.extxyz"], "does not exist"),
  ],
)
def test_usage_errors(tiny_model, argv, message, capsys):
  argv = [tiny_model if a == "TINY" else a for a in argv]
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


@pytest.fixture
def read_only(tmp_path, monkeypatch):
  """A folder nobody may write into (also for root, who ignores permission bits)."""
  folder = tmp_path / "ro"
  folder.mkdir()
  folder.chmod(0o500)
  real = os.access
  monkeypatch.setattr(
    os, "access", lambda p, mode: real(p, mode) and not (Path(p) == folder and mode & os.W_OK)
  )
  yield folder
  folder.chmod(0o700)


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--out", "NODIR/x.traj"], "folder NODIR does not exist (create it first)"),
    (["--out", "RO/x.traj"], "folder RO is not writable"),
    (["--plot", "RO/x.png"], "--plot RO/x.png: folder RO is not writable"),
    (["--steps", "2147483648"], "more than one run can count"),
    (["--time", "1e9"], "more than one run can count"),
    (["NAN"], "NaN or infinite positions"),
  ],
)
def test_md_bad_inputs_before_any_work(tiny_model, tmp_path, read_only, capsys, extra, message):
  # one line naming the fix, exit status 2, and nothing written anywhere
  nan = tmp_path / "nan.extxyz"
  atoms = molecule("CH3CH2OH")
  atoms.positions[3, 1] = np.nan
  write(nan, atoms)
  names = {"NODIR": str(tmp_path / "nodir"), "RO": str(read_only), "NAN": str(nan)}
  for key, value in names.items():
    extra = [a.replace(key, value) for a in extra]
    message = message.replace(key, value)
  out = ["--out", str(tmp_path / "md.traj")] if "--out" not in extra else []
  before = sorted(p.name for p in tmp_path.iterdir())
  length = [] if {"--steps", "--time"} & set(extra) else ["--steps", "10"]
  assert cli.main(["md", "--model", tiny_model, *length, *out, *extra]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("engine", ["jax-md", "ase"])
def test_md_coincident_atoms_refused_up_front_by_both_engines(tiny_model, tmp_path, capsys, engine):
  xyz = tmp_path / "twin.extxyz"
  atoms = molecule("CH3CH2OH")
  atoms.positions[4] = atoms.positions[2] + [0.01, 0, 0]
  write(xyz, atoms)
  argv = ["md", str(xyz), "--model", tiny_model, "--steps", "10", "--engine", engine]
  assert cli.main(argv + ["--out", str(tmp_path / "t.traj")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "atoms 2 (O) and 4 (H) are only 0.01 Å apart" in err[-1]
  assert not (tmp_path / "t.traj").exists()


def test_md_resume_of_a_finished_run_and_of_nothing(tiny_model, tmp_path, capsys):
  traj = tmp_path / "done.traj"
  argv = ["md", "--model", tiny_model, "--dt", "0.25", "--steps", "20", "--out", str(traj)]
  assert cli.main(argv + ["--resume"]) == 0  # no file yet: says so and starts fresh
  captured = capsys.readouterr()
  assert "holds no frames yet: --resume starts a fresh run" in captured.err
  assert cli.main(argv + ["--resume"]) == 0  # already at step 20
  out = capsys.readouterr().out
  assert "already reaches step 20: nothing to run" in out and "nan" not in out


@pytest.mark.parametrize("engine", ["jax-md", "ase"])
def test_md_refuses_what_would_not_fit_in_memory(tiny_model, tmp_path, capsys, monkeypatch, engine):
  # both engines: one line with the figure and exit 2, before any work; nothing written
  from plugin import host

  monkeypatch.setattr(host, "available_memory_bytes", lambda: 1000)
  out = tmp_path / "md.traj"
  argv = ["md", "--model", tiny_model, "--engine", engine, "--steps", "10", "--out", str(out)]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "GiB for its" in err and "nothing was allocated" in err and "Traceback" not in err
  assert not out.exists()


def test_unknown_element_and_bad_values(tiny_model, tmp_path, capsys):
  xyz = tmp_path / "cu.xyz"
  write(xyz, molecule("H2O") + molecule("H2O"))
  from ase import Atoms

  write(xyz, Atoms("CuH", positions=[[0, 0, 0], [0, 0, 1.5]]))
  assert cli.main(["md", str(xyz), "--model", tiny_model]) == 2
  assert "Cu (Z=29)" in capsys.readouterr().err
  bad = tmp_path / "bad.xyz"
  bad.write_text("this is not a structure\n")
  assert cli.main(["md", str(bad), "--model", tiny_model]) == 2
  assert "cannot read structure" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["md", "--dt", "-1"])


def test_md_jax_md_engine_and_resume(tiny_model, tmp_path, capsys):
  traj = tmp_path / "run.traj"
  argv = ["md", "--model", tiny_model, "--ensemble", "nve", "--dt", "0.25", "--out", str(traj)]
  assert cli.main(argv + ["--steps", "40"]) == 0
  assert "steps/s" in capsys.readouterr().out
  assert cli.main(argv + ["--steps", "40"]) == 2  # never overwrites
  assert "--resume" in capsys.readouterr().err
  assert cli.main(argv + ["--steps", "80", "--resume"]) == 0
  assert read(traj, -1).info["md_step"] == 80


def test_train_with_time_limit_then_eval_reports_held_out_trajectories(
  tmp_path, capsys, monkeypatch
):
  from ase.build import bulk
  from ase.calculators.emt import EMT

  images = []
  for i in range(12):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=i)
    a.calc = EMT()
    a.get_potential_energy(), a.get_forces(), a.get_stress()
    a.info.update(trajectory=f"run{i // 3}", config_type="bulk", temperature_K=300.0)
    images.append(a)
  data, model = tmp_path / "cu.extxyz", tmp_path / "cu.eqm"
  write(data, images)
  hyper = '{"features": 8, "max_degree": 1, "num_iterations": 1, "num_basis": 4}'
  # main(argv) called in a process that imported eqattn an hour ago: the budget counts from
  # the call (from the import only for the console script, whose import is its start)
  monkeypatch.setattr(cli, "STARTED", time.perf_counter() - 3600)
  assert (
    cli.main(
      [
        "train",
        str(data),
        "--species",
        "Cu",
        "--cutoff",
        "3.0",
        "--model-config",
        hyper,
        "--epochs",
        "2",
        "--time-limit",
        "5",
        "--batch-size",
        "4",
        "--train-config",
        '{"ema_decay": 0.9}',
        "--out",
        str(model),
      ]
    )
    == 0
  )
  out = capsys.readouterr().out  # what was trained and the held-out figures, in meV
  assert not (tmp_path / "cu.eqm.ckpt").exists()  # the default checkpoint went with success
  # outputs are checked before any work: a trained model is never replaced without --force,
  # and a missing folder is named
  kept = model.read_bytes()
  argv = ["train", str(data), "--species", "Cu", "--epochs", "1", "--out"]
  assert cli.main(argv + [str(model)]) == 2 and model.read_bytes() == kept
  assert "exists: pass --force" in capsys.readouterr().err
  assert cli.main(argv + [str(tmp_path / "nodir" / "m.eqm")]) == 2
  assert "does not exist (create it first)" in capsys.readouterr().err
  assert "trained 2 epochs in" in out and "of a 5-minute budget" in out
  assert "held-out trajectories: forces MAE" in out and "meV/atom), stress MAE" in out
  meta = potentials.load(model).metadata["training"]
  assert meta["config"]["ema_decay"] == 0.9 and meta["config"]["split"] == "trajectory"
  assert meta["split_parts"]["test"]["trajectories"] and meta["epochs_run"] == 2
  capsys.readouterr()
  assert cli.main(["eval", str(model), str(data)]) == 0
  out = capsys.readouterr().out
  # the test and validation trajectories apart (together the 6 held-out frames)
  rows = dict(re.findall(r"\| (test|validation|training) trajectories \| (\d+) \|", out))
  assert int(rows["test"]) + int(rows["validation"]) == 6 and rows["training"] == "6"
  assert int(rows["test"]) > 0 and int(rows["validation"]) > 0
  # fine-tune: the trained model is the start; its architecture is fixed, species optional
  tuned = tmp_path / "tuned.eqm"
  argv = ["train", str(data), "--init", str(model), "--epochs", "1", "--batch-size", "4"]
  assert cli.main(argv + ["--out", str(tuned)]) == 0
  back = potentials.load(tuned)
  assert back.config == potentials.load(model).config
  assert back.metadata["fine_tuned_from"]["training"]["epochs_run"] == 2
  assert back.metadata["training"]["epochs_run"] == 1
  capsys.readouterr()
  assert cli.main(argv + ["--cutoff", "4.0"]) == 2
  assert "drop ['--cutoff']" in capsys.readouterr().err
  assert cli.main(argv + ["--species", "Ag"]) == 2
  assert "differs from" in capsys.readouterr().err
  assert cli.main(["train", str(data)]) == 2
  assert "--species" in capsys.readouterr().err


@pytest.mark.slow  # tests/test_jax_md.py runs small periodic cells by default
def test_md_jax_md_engine_small_periodic_cell(tiny_model, tmp_path, capsys):
  # 3-4 Å cell, narrower than 2 * (cutoff + skin): JAX-MD runs it with periodic images
  from ase import Atoms

  xyz, traj = tmp_path / "co.extxyz", tmp_path / "co.traj"
  write(
    xyz, Atoms("CO", positions=[[0.2, 0.3, 0.4], [1.4, 0.3, 0.4]], cell=[3.0, 3.5, 4.0], pbc=True)
  )
  assert (
    cli.main(
      [
        "md",
        str(xyz),
        "--model",
        tiny_model,
        "--ensemble",
        "nve",
        "--dt",
        "0.25",
        "--steps",
        "20",
        "--out",
        str(traj),
      ]
    )
    == 0
  )
  assert "steps/s" in capsys.readouterr().out
  last = read(traj, -1)
  assert last.info["md_step"] == 20 and np.isfinite(last.get_potential_energy())


def test_md_several_structures_and_replicas_in_one_program(tiny_model, tmp_path, capsys):
  from ase import Atoms

  co = tmp_path / "co.extxyz"
  write(
    co, Atoms("CO", positions=[[0.2, 0.3, 0.4], [1.4, 0.3, 0.4]], cell=[3.0, 3.5, 4.0], pbc=True)
  )
  ethanol = tmp_path / "ethanol.xyz"
  write(ethanol, molecule("CH3CH2OH"))
  out = tmp_path / "many.extxyz"
  argv = [
    "md",
    str(ethanol),
    str(co),
    "--model",
    tiny_model,
    "--temperatures",
    "200,400",
    "--steps",
    "20",
    "--dt",
    "0.25",
    "--out",
    str(out),
  ]
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  assert "4 systems" in text and "atom-steps/s" in text and "ns/day per system" in text
  for i, (n, t) in enumerate([(9, 200), (9, 400), (2, 200), (2, 400)]):
    frames = read(tmp_path / f"many.{i}.extxyz", ":")
    assert len(frames[-1]) == n and frames[-1].info["md_step"] == 20
    assert f"system {i} (" in text and f", {t} K," in text
    assert (tmp_path / f"many.{i}.csv").exists()
  assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err
  assert (
    cli.main(
      argv[:-4]
      + ["--replicas", "3", "--steps", "20", "--dt", "0.25", "--out", str(tmp_path / "r.traj")]
    )
    == 2
  )
  assert "--temperatures has 2 values for --replicas 3" in capsys.readouterr().err
  assert cli.main(argv + ["--engine", "ase"]) == 2
  assert "only with --engine jax-md" in capsys.readouterr().err


def test_md_options_come_from_the_ensembles_table_and_defaults():
  from plugin.md import DEFAULTS, ENSEMBLE_TABLE

  sub = cli.build_parser()._subparsers._group_actions[0].choices["md"]
  options = {a.dest: a for a in sub._actions}
  assert set(options["ensemble"].choices) == {
    e.cli_name for e in ENSEMBLE_TABLE.values() if e.cli_name
  }
  assert options["temperature"].default == DEFAULTS.temperature
  assert options["dt"].default == DEFAULTS.timestep


def test_help_shows_defaults_and_version(capsys):
  from potentials.training import TrainConfig, config as training_config

  assert cli.TRAIN_HELP_DEFAULTS == {
    "pairs_per_batch": training_config.PAIRS_PER_BATCH,
    "max_auto_batch": training_config.MAX_AUTO_BATCH,
    "learning_rate": TrainConfig().learning_rate,
  }
  choices = cli.build_parser()._subparsers._group_actions[0].choices
  flat = lambda text: " ".join(text.split())  # wrapped lines joined
  md_help, train_help = flat(choices["md"].format_help()), flat(choices["train"].format_help())
  for text in ("(default: 300.0)", "(default: 0.5)", "(default: 1.01325)", "(default: nvt)"):
    assert text in md_help
  assert "about 720 neighbour pairs, 1 to 8 frames" in train_help and "(default 0.01)" in train_help
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("eqattn ")


def test_md_pressure_and_intervals_reach_the_run(tiny_model, tmp_path, capsys):
  out = tmp_path / "iv.extxyz"
  argv = ["md", "--model", tiny_model, "--steps", "20", "--dt", "0.25", "--out", str(out)]
  argv += ["--log-interval", "4", "--traj-interval", "10", "--pressure", "250"]
  assert cli.main(argv) == 0
  frames = read(out, ":")
  assert [f.info["md_step"] for f in frames] == [0, 10, 20]
  with open(out.with_suffix(".csv")) as f:
    steps = [int(float(line.split(",")[0])) for line in f.readlines()[1:]]
  assert steps == [0, 4, 8, 12, 16, 20]
  args = cli.build_parser().parse_args(argv[:-6] + ["--pressure", "250", "--ensemble", "npt"])
  from plugin import md

  options = cli._md_options(
    md,
    args,
    ensemble=md.ENSEMBLE_TABLE["npt"],
    steps=20,
    temperature=300.0,
    seed=0,
    traj=None,
    log_file=None,
  )
  assert options.pressure == 250.0 and options.ensemble == "npt"


def test_train_budget_default_is_the_training_default():
  from potentials.training import DEFAULT_MINUTES

  sub = cli.build_parser()._subparsers._group_actions[0].choices["train"]
  help_text = {a.dest: a.help for a in sub._actions}["time_limit"]
  assert (
    cli.DEFAULT_TRAIN_MINUTES == DEFAULT_MINUTES and f"{DEFAULT_MINUTES:g} minutes" in help_text
  )


def test_parser_imports_neither_jax_nor_jax_md():
  # `eqattn --help` and option errors stay fast: the table and defaults are cheap to import.
  import os
  import subprocess
  import sys

  code = (
    "import sys, plugin.cli; plugin.cli.build_parser(); "
    "print(sorted(m for m in ('jax', 'jax_md.space', 'potentials') if m in sys.modules))"
  )  # the package jax_md itself is plugin.jax_md_import's empty lazy shell: nothing loaded
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd=root,
    env={**os.environ, "PYTHONPATH": str(root)},
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_train_committee_option_and_its_deprecated_name(capsys):
  # `--ensemble` means the thermodynamic ensemble in `eqattn md`; train's committee size is
  # `--committee`, and the old name still works with a warning naming the new one
  parser = cli.build_parser()
  new = parser.parse_args(["train", "data.extxyz", "--species", "H", "--committee", "3"])
  assert new.committee == 3 and "deprecated" not in capsys.readouterr().err
  old = parser.parse_args(["train", "data.extxyz", "--species", "H", "--ensemble", "3"])
  assert old.committee == 3
  assert "--ensemble is deprecated here, use --committee" in capsys.readouterr().err
  assert "--ensemble" not in parser._subparsers._group_actions[0].choices["train"].format_help()


def test_train_readout_heads_option_and_its_deprecated_name(capsys):
  # `--heads` read as the attention's heads (ModelConfig.num_heads): it is --readout-heads now
  parser = cli.build_parser()
  new = parser.parse_args(["train", "data.extxyz", "--species", "H", "--readout-heads", "3"])
  assert new.readout_heads == 3 and "deprecated" not in capsys.readouterr().err
  old = parser.parse_args(["train", "data.extxyz", "--species", "H", "--heads", "3"])
  assert old.readout_heads == 3
  err = capsys.readouterr().err
  assert "--heads is deprecated here, use --readout-heads (removed in 0.3)" in err
  help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
  assert "--heads" not in help_text and "--readout-heads" in help_text


def test_md_summary_separates_start_up_from_the_steady_rate():
  # 3 chunks of 100 steps: the first compiles (10 s), the others take 1 s each
  line = cli._rates(12.5, 300, 0.5, 9, chunk_times=[10.0, 1.0, 1.0], chunk=100)
  assert "start-up and compilation 10.5 s" in line and "steady 100.0 steps/s" in line
  assert "4.32 ns/day" in line and f"{1e6 / (100 * 9):.3g} µs/atom/step" in line
  one = cli._rates(3.0, 20, 0.5, 9, chunk_times=[2.5], chunk=20)
  assert "6.7 steps/s" in one and "compilation included" in one


def test_train_checkpoints_by_default_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
  from ase.build import bulk
  from ase.calculators.emt import EMT

  images = []
  for i in range(8):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=i)
    a.calc = EMT()
    a.get_potential_energy(), a.get_forces()
    a.info.update(trajectory=f"run{i // 2}", temperature_K=300.0)
    images.append(a)
  data, model = tmp_path / "cu.extxyz", tmp_path / "cu.eqm"
  write(data, images)
  hyper = '{"features": 8, "max_degree": 1, "num_iterations": 1, "num_basis": 4}'
  argv = ["train", str(data), "--species", "Cu", "--cutoff", "3.0", "--model-config", hyper]
  argv += ["--epochs", "2", "--batch-size", "4", "--out", str(model)]
  real_save = potentials.Potential.save

  def killed(self, path):  # interrupted after training, before the model is written
    raise KeyboardInterrupt

  monkeypatch.setattr(potentials.Potential, "save", killed)
  assert cli.main(argv) == 130
  err = capsys.readouterr().err
  ckpt = tmp_path / "cu.eqm.ckpt"
  assert ckpt.exists() and not model.exists() and f"continue from {ckpt}" in err
  monkeypatch.setattr(potentials.Potential, "save", real_save)
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert f"resuming from {ckpt}" in out and "trained 2 epochs" in out
  assert model.exists() and not ckpt.exists()


def test_md_repeated_without_out_writes_the_next_free_file(
  tiny_model, tmp_path, monkeypatch, capsys
):
  # the README's first command works when repeated; a path the user named is never changed
  monkeypatch.chdir(tmp_path)
  argv = ["md", "--model", tiny_model, "--steps", "10", "--dt", "0.25"]
  assert cli.main(argv) == 0 and (tmp_path / "md.traj").exists()
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "md.traj holds an earlier run: writing md-2.traj" in capsys.readouterr().out
  assert read(tmp_path / "md-2.traj", -1).info["md_step"] == 10
  assert (tmp_path / "md-2.csv").exists()
  assert cli.main(argv + ["--out", "md.traj"]) == 2
  assert "md.traj exists; pass --resume" in capsys.readouterr().err
