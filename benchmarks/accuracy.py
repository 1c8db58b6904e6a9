"""Accuracy side by side: an eqattn model file against MACE trained on the same split.

The split is the one ``potentials.training.train`` makes with its defaults (whole held-out
trajectories for test, a random 5 % of the training trajectories' frames as ``test_random``),
written as extxyz files that MACE trains on. Both models are then evaluated by the same code
(``accuracy_worker.py``, through their ASE calculators) on the same frames: held-out
trajectories (all, and per temperature) and the random frames, plus E+F cost per atom on one
ethanol molecule and on 64 well-separated ones in one structure.

MACE runs in its own venv (never a dependency of eqattn; torch from the local CPU wheel, an
unpinned torch pulls a multi-GB CUDA build):

    python3 -m venv /work/venvs/mace
    /work/venvs/mace/bin/pip install \
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /work/venvs/mace/bin/pip install mace-torch==0.3.16

Then, on one core (MACE is held to one torch thread; CPU seconds are the fair measure on a
shared core, both CPU and wall are reported):

    taskset -c 1 python benchmarks/accuracy.py --mace-python /work/venvs/mace/bin/python \\
        --mace-minutes 30 --out /tmp/accuracy
    ... --mace-epochs 2                 # smoke test
    ... --eqattn my.eqm                 # another eqattn model file (default: shipped ethanol)
    ... --reuse                         # evaluate the MACE model already trained in --out

Equal time, both trained here side by side (``--train-eqattn M``): ``eqattn train DATA
--species ... --time-limit M`` (no other option) on one core while MACE trains for the epochs
that fit M CPU-minutes on the other, each process pinned to its core (``--cores``); ``--new``
adds whole trajectories no training frame came from (benchmarks/recipe_check.py --new makes
them, one above the training temperatures), reported per temperature::

    python benchmarks/accuracy.py --mace-python /work/venvs/mace/bin/python --train-eqattn 15 \
        --mace-minutes 15 --new out/recipes/ethanol-new.extxyz.gz --out out/acc/ethanol15

MACE recipe (issue 13): hidden irreps 32x0e+32x1o, max_ell 3, correlation 3, 2 interactions,
r_max 5 Å, 8 Bessel functions, EMA 0.99, AMSGrad, lr 0.01, batch 10, energy weight 1,
forces weight 100, float32, E0s by least squares ("average"); everything else MACE's defaults.
With ``--mace-minutes`` the epochs are chosen from a 2-epoch calibration run (its CPU time,
less the start-up/final-evaluation overhead measured from MACE's log) to fit the CPU budget.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import threading
import sys
import time

import numpy as np

import potentials
from potentials import training
from plugin.ase import Calculator
from plugin.data import read_frames, read_images

import accuracy_worker
from provenance import provenance

WORKER = pathlib.Path(accuracy_worker.__file__).resolve()
ROOT = pathlib.Path(__file__).resolve().parents[1]
CUTOFF = 5.0
PARTS = ("train", "valid", "test", "test_random")
MACE_RECIPE = [
  "--model",
  "MACE",
  "--hidden_irreps",
  "32x0e+32x1o",
  "--max_ell",
  "3",
  "--correlation",
  "3",
  "--num_interactions",
  "2",
  "--r_max",
  str(CUTOFF),
  "--num_radial_basis",
  "8",
  "--ema",
  "--ema_decay",
  "0.99",
  "--amsgrad",
  "--lr",
  "0.01",
  "--batch_size",
  "10",
  "--valid_batch_size",
  "20",
  "--energy_weight",
  "1",
  "--forces_weight",
  "100",
  "--default_dtype",
  "float32",
  "--E0s",
  "average",
  "--device",
  "cpu",
  "--seed",
  "0",
  "--energy_key",
  "REF_energy",
  "--forces_key",
  "REF_forces",
  "--save_cpu",
]
SETUP = (
  "python3 -m venv /work/venvs/mace && /work/venvs/mace/bin/pip install "
  "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl && "
  "/work/venvs/mace/bin/pip install mace-torch==0.3.16"
)


# ----------------------------------------------------------------------------- the split
def write_parts(images, frames, out: pathlib.Path) -> dict:
  """The default training split as extxyz files (labels under REF_*, tags in info)."""
  import ase.io

  parts = training.split_parts(frames, training.TrainConfig())
  paths = {}
  for name in PARTS:
    rows = []
    for i in parts[name]:
      a = images[int(i)].copy()  # drops the calculator; labels go in as plain keys
      a.info["REF_energy"] = frames[i].energy
      a.arrays["REF_forces"] = np.asarray(frames[i].forces)
      rows.append(a)
    paths[name] = out / f"{name}.xyz"
    ase.io.write(paths[name], rows, format="extxyz")
  return {"parts": parts, "paths": paths}


def timing_structures(images, test_idx, out: pathlib.Path) -> pathlib.Path:
  """One test molecule, and 64 of them 12 Å apart (no pairs between them); for a periodic
  cell, one test cell and its 2 x 2 x 2 supercell."""
  import ase.io

  single = images[int(test_idx[0])].copy()
  if single.pbc.any():
    path = out / "timing.xyz"
    ase.io.write(path, [single, single.repeat(2)], format="extxyz")
    return path
  many = single.copy()
  del many[:]
  for k in range(64):
    m = images[int(test_idx[k])].copy()
    m.positions += 12.0 * np.array(np.unravel_index(k, (4, 4, 4)))
    many += m
  path = out / "timing.xyz"
  ase.io.write(path, [single, many], format="extxyz")
  return path


# ----------------------------------------------------------------------------- metrics
def errors(pred: dict, frames) -> dict:
  """Force MAE/RMSE (meV/Å) over components, energy MAE (meV and meV/atom)."""
  de = np.array(pred["energy"]) - np.array([f.energy for f in frames])
  df = np.concatenate([np.ravel(np.array(p) - f.forces) for p, f in zip(pred["forces"], frames)])
  n = np.array([len(f.numbers) for f in frames])
  return {
    "frames": len(frames),
    "forces_mae": 1e3 * float(np.mean(np.abs(df))),
    "forces_rmse": 1e3 * float(np.sqrt(np.mean(df**2))),
    "energy_mae": 1e3 * float(np.mean(np.abs(de))),
    "energy_per_atom_mae": 1e3 * float(np.mean(np.abs(de / n))),
  }


def report(predictions: dict, split: dict, frames, new=None) -> dict:
  """Errors on the held-out trajectories (all, and per temperature), the random frames, and
  ``new`` = (path, frames) trajectories per temperature (``new_T=...``)."""
  out = {}
  for name in ("test", "test_random"):
    pred = predictions[str(split["paths"][name])]
    idx = split["parts"][name]
    out[name] = errors(pred, [frames[i] for i in idx])
    if name == "test":
      out.update(_by_temperature(pred, [frames[i] for i in idx], "test"))
  if new is not None:
    out["new"] = errors(predictions[str(new[0])], new[1])
    out.update(_by_temperature(predictions[str(new[0])], new[1], "new"))
  return out


def _by_temperature(pred: dict, frames, prefix: str) -> dict:
  temps = np.array([f.temperature for f in frames])
  out = {}
  for t in sorted(set(temps)):
    sel = np.flatnonzero(temps == t)
    sub = {"energy": [pred["energy"][k] for k in sel], "forces": [pred["forces"][k] for k in sel]}
    out[f"{prefix}_T={t:g}K"] = errors(sub, [frames[k] for k in sel])
  return out


# ----------------------------------------------------------------------------- MACE
def _run_timed(cmd, log: pathlib.Path, pin=(), cwd=None) -> dict:
  """Run a command (on the cores in ``pin``, if any), stdout+stderr to ``log``; its own CPU
  seconds (user+sys) and wall."""
  if pin:
    cmd = ["taskset", "-c", ",".join(map(str, pin)), *cmd]
  env = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
  }  # e3nn 0.4.4 pickles with torch >= 2.6
  t0 = time.perf_counter()
  with open(log, "w") as fh:
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    tail = log.read_text().splitlines()[-25:]
    raise RuntimeError(
      f"{' '.join(map(str, cmd[:4]))} failed (exit {proc.returncode}); end of {log}:\n"
      + "\n".join(tail)
    )
  return {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall}


def train_mace(py, split, out: pathlib.Path, epochs: int, name="mace", pin=()) -> dict:
  work = out / name
  work.mkdir(parents=True, exist_ok=True)
  dirs = [f"--{d}" for d in ("work_dir", "model_dir", "log_dir", "checkpoints_dir", "results_dir")]
  args = [a for d in dirs for a in (d, str(work))]
  clock = work / "epoch_cpu_s.json"
  cmd = [
    py,
    str(WORKER),
    "train",
    str(clock),
    "--name",
    name,
    "--train_file",
    str(split["paths"]["train"]),
    "--valid_file",
    str(split["paths"]["valid"]),
    "--max_num_epochs",
    str(epochs),
    *MACE_RECIPE,
    *args,
  ]
  res = _run_timed(cmd, work / "train.log", pin)
  res.update(
    epochs=epochs,
    model=str(work / f"{name}.model"),
    log=str(work / "train.log"),
    epoch_cpu_s=json.loads(clock.read_text()) if clock.exists() else [],
  )
  return res


def calibrated_epochs(py, split, out, minutes: float, pin=()) -> tuple:
  """Epochs that fit ``minutes`` of CPU: a 2-epoch run gives the CPU seconds of its last
  epoch (training + validation) and the fixed overhead (the rest: start-up, final
  evaluation)."""
  cal = train_mace(py, split, out, 2, name="mace_calibration", pin=pin)
  stamps = cal["epoch_cpu_s"]
  if len(stamps) < 3:
    raise RuntimeError(f"no epoch CPU times from {cal['log']}; pass --mace-epochs")
  per_epoch = stamps[-1] - stamps[-2]
  overhead = cal["cpu_s"] - 2 * per_epoch
  return max(1, int((60 * minutes - overhead) / per_epoch)), {
    **cal,
    "per_epoch_cpu_s": per_epoch,
    "overhead_cpu_s": overhead,
  }


def mace_python(path) -> str:
  if not path:
    raise SystemExit(
      "pass --mace-python PATH (a venv with mace-torch); set one up with:\n  " + SETUP
    )
  try:
    probe = subprocess.run(
      [path, "-c", "import mace, torch"],
      capture_output=True,
      text=True,
      env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    problem = probe.stderr.strip()[-300:] if probe.returncode else None
  except OSError as err:
    problem = str(err)
  if problem:
    raise SystemExit(
      f"{path} cannot import mace and torch ({problem}); set up the venv with:\n  {SETUP}"
    )
  return path


# ----------------------------------------------------------------------------- eqattn
def check_no_leak(pot, split, frames):
  """The model's own training trajectories must not include our held-out ones."""
  parts = pot.metadata.get("training", {}).get("split_parts", {})
  seen = set(parts.get("train", {}).get("trajectories", []))
  held = {frames[i].trajectory for i in split["parts"]["test"]}
  if seen & held:
    raise SystemExit(
      f"the eqattn model was trained on held-out trajectories {sorted(seen & held)}"
      "; pass a model trained with the default split of this data"
    )


def eqattn_row(path, split, frames, timing_path, new=None, run=None) -> dict:
  """Measures of an eqattn model file; ``run``: the ``eqattn train`` process's own times."""
  pot = potentials.load(path)
  check_no_leak(pot, split, frames)
  parts = [str(split["paths"][n]) for n in ("test", "test_random")]
  parts += [str(new[0])] if new else []
  res = accuracy_worker.measure(Calculator(pot), timing_path, parts)
  info = pot.metadata.get("training", {})
  return {
    "model": f"eqattn ({path})",
    "epochs": info.get("epochs_run"),
    "train_wall_s": run["wall_s"] if run else info.get("seconds"),
    "train_cpu_s": run["cpu_s"] if run else info.get("cpu_seconds"),
    "training": {
      k: info.get(k)
      for k in ("seconds", "training_seconds", "optimisation_seconds", "finish_seconds", "steps")
    },
    "metrics": report(res["predictions"], split, frames, new),
    "timing": res["timing"],
  }


def train_eqattn(
  data, species, minutes: float, out: pathlib.Path, pin=(), extra=(), tag=""
) -> dict:
  """``eqattn train DATA --species ... --time-limit M`` (and ``extra`` options, none for the
  defaults); the process's times."""
  model = out / f"eqattn{tag}.eqm"
  for stale in (model, out / f"eqattn{tag}.ckpt"):
    stale.unlink(missing_ok=True)
  # `eqattn` of this script's tree (python -m from its root), whatever is installed
  args = ["train", str(data), "--species", *species, "--time-limit", f"{minutes:g}", *extra]
  cmd = [sys.executable, "-m", "plugin.cli", *args, "--out", str(model)]
  res = _run_timed(cmd, out / f"eqattn{tag}_train.log", pin, cwd=ROOT)
  return {**res, "model": str(model), "command": "eqattn " + " ".join(args)}


# ----------------------------------------------------------------------------- table
def _fmt(x, spec=".1f"):
  return "—" if x is None else format(x, spec)


def table(rows) -> str:
  temps = [
    k
    for prefix in ("test_T=", "new_T=")
    for k in sorted(
      {k for r in rows for k in r["metrics"] if k.startswith(prefix)},
      key=lambda k: float(k.split("=")[1][:-1]),
    )
  ]
  head = (
    [
      "model",
      "train CPU-min",
      "train wall-min",
      "epochs",
      "held-out F MAE",
      "F RMSE",
      "E MAE (meV)",
    ]
    + [f"F MAE {k.replace('_T=', ' ')}" for k in temps]
    + ["test_random F MAE", "test_random E MAE"]
    + [f"µs/atom ({t['atoms']} atoms)" for t in rows[0]["timing"]]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    m = r["metrics"]
    cells = [
      r["model"],
      _fmt(r["train_cpu_s"] and r["train_cpu_s"] / 60),
      _fmt(r["train_wall_s"] and r["train_wall_s"] / 60),
      _fmt(r["epochs"], "d"),
      _fmt(m["test"]["forces_mae"]),
      _fmt(m["test"]["forces_rmse"]),
      _fmt(m["test"]["energy_mae"]),
    ] + [_fmt(m[k]["forces_mae"]) if k in m else "—" for k in temps]
    cells += [_fmt(m["test_random"]["forces_mae"]), _fmt(m["test_random"]["energy_mae"])]
    cells += [_fmt(1e6 * t["cpu_s"] / t["atoms"], ".0f") for t in r["timing"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def budget_table(paths) -> str:
  """Equal-time rows of several ``accuracy.json`` files: held-out force MAE per temperature
  (the split's test trajectories, then the new ones), eqattn / MACE and their ratio, energy
  MAE, and the minutes each side trained."""
  lines = [
    "| data | budget (min) | held-out set | eqattn F MAE (meV/Å) | MACE F MAE | ratio "
    "| eqattn E MAE (meV/atom) | MACE E MAE |",
    "|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for path in paths:
    res = json.loads(pathlib.Path(path).read_text())
    eq, mace = res["rows"]
    name = pathlib.Path(res["data"]).name.split(".")[0]
    words = eq.get("command", "").split()
    minutes = res.get("minutes") or words[words.index("--time-limit") + 1]
    keys = ["test"] + [k for k in eq["metrics"] if "_T=" in k]
    for k in keys:
      a, b = eq["metrics"][k], mace["metrics"][k]
      label = "all held-out trajectories" if k == "test" else k.replace("_T=", " ")
      lines.append(
        f"| {name} | {minutes} | {label} | {a['forces_mae']:.1f} | "
        f"{b['forces_mae']:.1f} | {a['forces_mae'] / b['forces_mae']:.2f} | "
        f"{a['energy_per_atom_mae']:.2f} | {b['energy_per_atom_mae']:.2f} |"
      )
  return "\n".join(lines)


def variants_table(paths) -> str:
  """One row per eqattn run of several ``accuracy.json`` files (variants of the defaults on
  one dataset): its options, epochs, held-out and new-trajectory force MAE, energy MAE."""
  lines = [
    "| options added to `eqattn train` | budget (min) | epochs | held-out F MAE (meV/Å) "
    "| new trajectories F MAE | E MAE (meV/atom) | provenance |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for path in paths:
    res = json.loads(pathlib.Path(path).read_text())
    eq, m, prov = res["rows"][0], res["rows"][0]["metrics"], res.get("provenance", {})
    new = f"{m['new']['forces_mae']:.1f}" if "new" in m else "—"
    lines.append(
      f"| {res.get('eqattn_args') or '(none)'} | {res.get('minutes')} | {eq['epochs']} | "
      f"{m['test']['forces_mae']:.1f} | {new} | {m['test']['energy_per_atom_mae']:.2f} | "
      f"{prov.get('date', '?')[:10]}, {prov.get('commit', '?')} |"
    )
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default="data/ethanol.extxyz.gz")
  ap.add_argument("--eqattn", default="ethanol", help="eqattn model file or shipped name")
  ap.add_argument(
    "--train-eqattn",
    type=float,
    metavar="MINUTES",
    help="train eqattn here with `eqattn train DATA --species ... --time-limit MINUTES` "
    "(beside MACE, each on one core) instead of measuring --eqattn",
  )
  ap.add_argument(
    "--eqattn-args", default="", help="options added to that command (a variant's; none: defaults)"
  )
  ap.add_argument("--tag", default="", help="names this eqattn run's files (MACE's are shared)")
  ap.add_argument("--mace-only", action="store_true", help="train and evaluate MACE only")
  ap.add_argument("--new", help="extra held-out trajectories (extxyz) reported per temperature")
  ap.add_argument("--cores", type=int, nargs=2, default=(0, 1), help="eqattn's and MACE's core")
  ap.add_argument(
    "--mace-python",
    default=os.environ.get("MACE_PYTHON"),
    help="Python of a venv with mace-torch (or $MACE_PYTHON)",
  )
  budget = ap.add_mutually_exclusive_group()
  budget.add_argument(
    "--mace-minutes",
    type=float,
    default=30.0,
    help="MACE training budget in CPU minutes (one thread)",
  )
  budget.add_argument("--mace-epochs", type=int, help="train MACE for exactly this many epochs")
  ap.add_argument(
    "--reuse", action="store_true", help="evaluate the models already trained in --out"
  )
  ap.add_argument("--out", default="accuracy_out", help="split files, MACE run, results")
  ap.add_argument("--json", help="results file (default OUT/accuracy.json)")
  ap.add_argument("--report", nargs="+", metavar="JSON", help="only print the equal-time table")
  ap.add_argument("--report-variants", nargs="+", metavar="JSON", help="only print variants")
  args = ap.parse_args(argv)
  if args.report or args.report_variants:
    print(budget_table(args.report) if args.report else variants_table(args.report_variants))
    return 0
  py = mace_python(args.mace_python)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  images = read_images(args.data)
  frames = read_frames(images, CUTOFF)
  split = write_parts(images, frames, out)
  timing_path = timing_structures(images, split["parts"]["test"], out)
  new = None
  if args.new:
    new = (pathlib.Path(args.new).resolve(), read_frames(args.new, CUTOFF))
  print({n: len(v) for n, v in split["parts"].items()}, flush=True)
  eq_cores, mace_cores = ((args.cores[0],), (args.cores[1],))
  eq_run, eq_thread = _start_eqattn(args, images, out, eq_cores)
  if eq_thread is None and not args.mace_only:
    eq_row = eqattn_row(args.eqattn, split, frames, timing_path, new)  # fails fast if leaky
  run = _mace_run(args, py, split, out, mace_cores)
  if eq_thread is not None:
    eq_thread.join()
    if "error" in eq_run:
      raise SystemExit(eq_run["error"])
    (out / f"eqattn{args.tag}_train.json").write_text(json.dumps(eq_run, indent=1))
    eq_row = eqattn_row(eq_run["model"], split, frames, timing_path, new, eq_run)
    eq_row["command"] = eq_run["command"]
  print(
    f"MACE trained: {run['epochs']} epochs, {run['cpu_s'] / 60:.1f} CPU-min, "
    f"{run['wall_s'] / 60:.1f} wall-min",
    flush=True,
  )
  res_path = out / "mace" / "evaluate.json"
  parts = [str(split["paths"][n]) for n in ("test", "test_random")] + ([str(new[0])] if new else [])
  if not (args.reuse and res_path.exists()):
    _run_timed(
      [py, str(WORKER), "evaluate", run["model"], str(res_path), str(timing_path), *parts],
      out / "mace" / "evaluate.log",
      mace_cores,
    )
  if args.mace_only:
    return 0
  mres = json.loads(res_path.read_text())
  mace_row = {
    "model": f"MACE {mres['version']}",
    "epochs": run["epochs"],
    "train_wall_s": run["wall_s"],
    "train_cpu_s": run["cpu_s"],
    "metrics": report(mres["predictions"], split, frames, new),
    "timing": mres["timing"],
  }
  rows = [eq_row, mace_row]
  print(table(rows))
  path = pathlib.Path(args.json or out / f"accuracy{args.tag}.json")
  path.write_text(
    json.dumps(
      {
        "data": args.data,
        "new": args.new,
        "minutes": args.train_eqattn,
        "eqattn_args": args.eqattn_args,
        "rows": rows,
        "mace_run": run,
        "mace_recipe": MACE_RECIPE,
        "split": {n: len(v) for n, v in split["parts"].items()},
        "provenance": provenance(),
      },
      indent=1,
    )
  )
  print(f"wrote {path}")


def _start_eqattn(args, images, out, cores):
  """``(run, thread)``: ``eqattn train`` started in a thread when ``--train-eqattn`` asks
  (``run`` fills in when it ends; an earlier model with ``--reuse``), else ``({}, None)``."""
  run: dict = {}
  if not args.train_eqattn:
    return run, None
  state = out / f"eqattn{args.tag}_train.json"
  if args.reuse and state.exists():
    run.update(json.loads(state.read_text()))
    thread = threading.Thread(target=lambda: None)  # nothing to wait for
    thread.start()
    return run, thread
  species = sorted({s for a in images for s in a.get_chemical_symbols()})

  def work():
    try:
      run.update(
        train_eqattn(
          pathlib.Path(args.data).resolve(),
          species,
          args.train_eqattn,
          out,
          cores,
          shlex.split(args.eqattn_args),
          args.tag,
        )
      )
    except Exception as err:  # reported by the main thread
      run["error"] = str(err)

  thread = threading.Thread(target=work)
  thread.start()
  return run, thread


def _mace_run(args, py, split, out, cores) -> dict:
  """MACE trained for ``--mace-epochs`` or the epochs that fit ``--mace-minutes`` of CPU."""
  state = out / "mace" / "train.json"
  if args.reuse and state.exists():
    return json.loads(state.read_text())
  cal = None
  epochs = args.mace_epochs
  if epochs is None:
    epochs, cal = calibrated_epochs(py, split, out, args.mace_minutes, cores)
    print(
      f"MACE calibration: {cal['per_epoch_cpu_s']:.1f} CPU s/epoch, "
      f"{cal['overhead_cpu_s']:.0f} s overhead -> {epochs} epochs",
      flush=True,
    )
  run = train_mace(py, split, out, epochs, pin=cores)
  run["calibration"] = cal
  state.parent.mkdir(parents=True, exist_ok=True)
  state.write_text(json.dumps(run, indent=1))
  return run


if __name__ == "__main__":
  sys.exit(main())
