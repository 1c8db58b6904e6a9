"""The ``eqattn`` command: MD, training, evaluation, conservation checks, model info.

    eqattn md [STRUCTURE] [--model NAME|PATH] [--ensemble nve|nvt|npt] [--temperature K]
              [--dt FS] [--steps N | --time PS] [--pressure BAR] [--engine jax-md|ase]
              [--out FILE] [--log-interval N] [--traj-interval N] [--plot PNG]
              [--resume] [--max-temperature K] [--max-force EV_PER_A]
              [--max-force-uncertainty EV_PER_A [--flag-uncertainty]]
    eqattn train DATA --species H C O [--time-limit MINUTES] [--epochs N]
                 [--readout-heads K [--force-heads] | --committee K] [--out MODEL]
    eqattn train DATA --init MODEL [--time-limit MINUTES] [--out MODEL]     (fine-tune)
    eqattn learn START.xyz [MORE.xyz ...] [--reference gfn2|gfn1|emt|module:callable]
                 [--temperatures 300,600] [--time-limit MINUTES] [--max-labels N]
                 [--uncertainty-target EV_PER_A] [--workers N] [--label-timeout S]
                 [--test FILE] [--out learn] [--resume]
    eqattn select TRAJ --model MODEL [--n 50] [--out new.extxyz]
    eqattn eval MODEL DATA [--parity PNG]
    eqattn check-conservation MODEL STRUCTURE [--temperature K] [--dt FS] [--time PS]
    eqattn info MODEL
    eqattn lammps IN_FILE [--model NAME|PATH] [--dtype float32|float64] [--var NAME VALUE]
                                                 (under mpirun for MPI; plugin.lammps)

Every command takes ``--no-cache``: by default compiled programs are kept in a persistent cache
(``plugin.cache``), so the second run of the same model and system skips XLA compilation.

Errors in user input (missing files, unreadable structures, unknown elements, bad option
values) end with a one-line message and exit status 2, not a traceback. ``eqattn md`` stopped by
a runaway guard (plugin.md.guards), or by an ensemble's force uncertainty, exits with status 3
and a one-line reason, its last good (or uncertain) frame written; Ctrl-C exits with 130 and
SIGTERM with 143, the files kept for ``--resume``.
"""

from __future__ import annotations

import argparse
import math
import json
import signal
import sys
import threading
import warnings
import time
from pathlib import Path

from typing import List, Optional

from plugin import cache, jax_md_import
from plugin.paths import check_writable_folder
from plugin.md.ensembles import CLI_NAMES as CLI_ENSEMBLES
from plugin.md.settings import DEFAULTS

# potentials.training.DEFAULT_MINUTES, stated here so that the parser needs no JAX import
# (tests/test_cli.py holds the two equal)
DEFAULT_TRAIN_MINUTES = 30
# TrainConfig's batch rule and peak learning rate, shown in --help without importing JAX (a
# test keeps them equal to potentials.training's)
TRAIN_HELP_DEFAULTS = {"pairs_per_batch": 720, "max_auto_batch": 8, "learning_rate": 1e-2}

# A training budget bounds the whole command: from the console script, from this module's import
# (JAX's start-up included); from `main(argv)` called in a longer-lived process, from that call.
STARTED = time.perf_counter()
DEFAULT_MODEL = "ethanol"
RUNAWAY_STATUS = 3  # `eqattn md` stopped by a runaway guard (plugin.md.guards)


class UsageError(Exception):
  """Bad user input: reported as one line, exit status 2."""


def _positive(kind):
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    if not value > 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value

  return parse


def _finite(text):
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a valid float") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
  return value


def _temperature_list(text):
  try:
    values = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected temperatures like 300,400,500, got {text!r}")
  if not values or any(not (v > 0) for v in values):
    raise argparse.ArgumentTypeError(f"temperatures must be > 0 K, got {text!r}")
  return values


def _load_model(name_or_path: str):
  import potentials
  from plugin.exported import json_memo

  try:
    return potentials.load(name_or_path, memo=json_memo("param-shapes"))
  except FileNotFoundError as e:
    raise UsageError(str(e)) from None
  except potentials.ModelFileError as e:
    raise UsageError(str(e)) from None


def _read_structure(path: Optional[str]):
  from ase.build import molecule
  from ase.io import read

  if path is None:
    return molecule("CH3CH2OH")
  if not Path(path).exists():
    raise UsageError(f"structure file {path!r} does not exist")
  try:
    atoms = read(path)
  except Exception as e:  # ASE raises many types for unreadable files
    raise UsageError(f"cannot read structure {path!r}: {e}") from None
  if len(atoms) == 0:
    raise UsageError(f"structure {path!r} has no atoms")
  return atoms


def _check_species(pot, numbers):
  import potentials

  try:
    pot.species_index(numbers)
  except potentials.UnknownElementError as e:
    raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------- md
def _systems(args):
  """``(structures, systems, temperatures, seeds)``: the files read, and every system to run
  (each structure times ``--replicas`` / ``--temperatures``) with its temperature and seed."""
  paths = args.structure or [None]
  structures = [_read_structure(p) for p in paths]
  if args.charge is not None:
    for atoms in structures:
      atoms.info["charge"] = args.charge
  temps = args.temperatures
  replicas = args.replicas or (len(temps) if temps else 1)
  if temps and len(temps) != replicas:
    raise UsageError(f"--temperatures has {len(temps)} values for --replicas {replicas}")
  temps = temps or [args.temperature] * replicas
  systems = [a for a in structures for _ in range(replicas)]
  return (
    structures,
    systems,
    temps * len(structures),
    [args.seed + i for i in range(len(systems))],
  )


def cmd_md(args) -> int:
  pot = _load_model(args.model)
  if args.ewald_accuracy is not None:
    try:
      pot = pot.with_ewald_accuracy(args.ewald_accuracy)
    except ValueError as e:
      raise UsageError(f"--ewald-accuracy: {e}") from None
  structures, systems, temps, seeds = _systems(args)
  for atoms in structures:
    _check_species(pot, atoms.numbers)
  if len(systems) > 1:
    return _cmd_md_many(args, pot, systems, temps, seeds)
  atoms, args.temperature = systems[0], temps[0]
  from plugin import md
  from plugin.md import output as md_output

  steps = _steps(args)
  ensemble = md.ENSEMBLE_TABLE[md.CLI_ENSEMBLES[args.ensemble]]
  if ensemble.variable_box and not all(atoms.pbc):
    raise UsageError(f"--ensemble {args.ensemble} needs a periodic structure")
  out = _out_path(args)
  try:
    md_output.traj_format(out)  # the format by extension; h5py for .h5 / .h5md
  except (ValueError, ImportError) as e:
    raise UsageError(str(e)) from None
  _check_md_inputs(args, [atoms], [out, out.with_suffix(".csv")])
  if args.resume and not (out.exists() and out.stat().st_size > 0):
    print(f"eqattn md: {out} holds no frames yet: --resume starts a fresh run", file=sys.stderr)
  print(
    f"eqattn md: {len(atoms)} atoms ({atoms.get_chemical_formula()}), model "
    f"{args.model!r}, {args.ensemble.upper()} {args.temperature:g} K, dt {args.dt:g} fs, "
    f"{steps} steps ({steps * args.dt / 1000:.3g} ps), engine {args.engine}, "
    f"trajectory {out}",
    flush=True,
  )
  if out.exists() and out.stat().st_size > 0 and not args.resume:
    raise UsageError(f"{out} exists; pass --resume to continue it, or --out NEW_FILE")
  if args.engine == "ase" and args.resume:
    raise UsageError("--resume is supported with --engine jax-md")
  bar = md.ProgressBar(steps, args.dt)
  t0 = time.perf_counter()
  try:
    with warnings.catch_warnings():  # a guard's RuntimeWarning: its reason is printed once below
      for what in ("MD stopped at step", "MD flagged at step"):
        warnings.filterwarnings("ignore", message=what, category=RuntimeWarning)
      result = _run_md(md, args, atoms, pot, ensemble, steps, out, bar)
    steps = result.steps if args.engine == "jax-md" else steps  # a resumed run: the rest only
  except (ValueError, MemoryError) as e:  # e.g. mixed periodicity, a cell too thin
    raise UsageError(str(e)) from None
  finally:
    bar.close()
  wall = time.perf_counter() - t0
  for event in getattr(result, "uncertain", []) if not result.stopped else []:
    print(f"eqattn md: {event['reason']}", file=sys.stderr)
  if result.stopped:
    print(f"eqattn md: {result.reason}; frames up to it are in {out}", file=sys.stderr)
    return RUNAWAY_STATUS
  if steps == 0:  # a resumed run that had already reached --steps / --time
    print(
      f"eqattn md: {out} already reaches step {result.total_steps}: nothing to run (ask for "
      "more --steps or --time to continue it)"
    )
    return 0
  _summary(
    result.log,
    len(atoms),
    wall,
    steps,
    args.dt,
    ensemble.invariant is not None and not ensemble.thermostat,
    getattr(result, "chunk_times_s", None),
    min(DEFAULTS.chunk, steps),
  )
  if args.plot:
    _plot_md(result.log, args.plot)
    print(f"plot written to {args.plot}")
  return 0


# step numbers are int32 inside the compiled MD loop
MAX_STEPS = 2**31 - 1


def _steps(args) -> int:
  steps = args.steps if args.steps else int(round(args.time * 1000.0 / args.dt))
  if steps < 1:
    raise UsageError("--time/--steps give no step to run")
  if steps > MAX_STEPS:
    raise UsageError(
      f"{steps} steps is more than one run can count ({MAX_STEPS}); run in parts with "
      "--resume, or a larger --dt"
    )
  return steps


DEFAULT_OUT = "md.traj"


def _out_path(args, count: int = 1) -> Path:
  """The trajectory path: --out as given (never overwritten: an existing one is refused with
  the fix named), else ``md.traj`` or, when that run exists, the next free ``md-2.traj``,
  ``md-3.traj``, ... (said on stdout): the README's first command works when repeated, and a
  path the user named is never changed behind their back."""
  if args.out or args.resume:
    return Path(args.out or DEFAULT_OUT)
  base = Path(DEFAULT_OUT)
  names = [base] + [base.with_name(f"{base.stem}-{k}{base.suffix}") for k in range(2, 1000)]
  from plugin.md import driver

  def taken(path):
    files = [path] if count == 1 else [driver.replica_path(path, i) for i in range(count)]
    return any(f.exists() and f.stat().st_size > 0 for f in files)

  path = next(p for p in names if not taken(p))
  if path != base:
    print(f"eqattn md: {base} holds an earlier run: writing {path} (--out names the file)")
  return path


def _check_md_inputs(args, structures, outputs) -> None:
  """Before any work: finite positions and cells, and writable output paths (trajectory,
  its CSV log, --plot)."""
  import numpy as np

  for i, atoms in enumerate(structures):
    if not np.isfinite(atoms.positions).all() or not np.isfinite(atoms.cell.array).all():
      where = f"structure {i}" if len(structures) > 1 else "the structure"
      raise UsageError(f"{where} has NaN or infinite positions or cell values: fix the file")
  for path in outputs:
    _check_writable(Path(path), "--out", overwrite=True)
  if args.plot:
    _check_writable(Path(args.plot), "--plot", overwrite=True)


def _cmd_md_many(args, pot, systems, temps, seeds) -> int:
  """Several systems (files, ``--replicas``, ``--temperatures``) in one compiled program:
  one trajectory and CSV log per system, named from ``--out`` (md.traj -> md.0.traj, ...)."""
  from plugin import md
  from plugin.md import driver, output as md_output

  if args.engine != "jax-md":
    raise UsageError("several systems run together only with --engine jax-md")
  steps = _steps(args)
  ensemble = md.ENSEMBLE_TABLE[md.CLI_ENSEMBLES[args.ensemble]]
  out = _out_path(args, len(systems))
  try:
    md_output.traj_format(out)
  except (ValueError, ImportError) as e:
    raise UsageError(str(e)) from None
  trajs = [driver.replica_path(out, i) for i in range(len(systems))]
  _check_md_inputs(args, systems, trajs + [t.with_suffix(".csv") for t in trajs])
  existing = [str(t) for t in trajs if t.exists() and t.stat().st_size > 0]
  if existing and not args.resume:
    raise UsageError(f"{existing[0]} exists; pass --resume to continue, or --out NEW_FILE")
  atoms_total = sum(len(a) for a in systems)
  print(
    f"eqattn md: {len(systems)} systems ({atoms_total} atoms), model {args.model!r}, "
    f"{args.ensemble.upper()} {', '.join(f'{t:g}' for t in sorted(set(temps)))} K, "
    f"dt {args.dt:g} fs, {steps} steps, one program; trajectories "
    f"{trajs[0]} .. {trajs[-1]}",
    flush=True,
  )
  bar = md.ProgressBar(steps, args.dt, desc=f"MD x{len(systems)}", atoms=atoms_total)
  t0 = time.perf_counter()
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="system .*MD stopped", category=RuntimeWarning)
      options = _md_options(
        md,
        args,
        ensemble=ensemble,
        steps=steps,
        temperature=temps,
        seed=seeds,
        traj=[str(t) for t in trajs],
        log_file=[str(t.with_suffix(".csv")) for t in trajs],
      )
      results = md.run(systems, pot, options, progress=bar)
  except (ValueError, MemoryError) as e:
    raise UsageError(str(e)) from None
  finally:
    bar.close()
  wall = time.perf_counter() - t0
  done = max(r.steps for r in results)
  nve = ensemble.invariant is not None and not ensemble.thermostat
  for i, (r, a, t) in enumerate(zip(results, systems, temps)):
    print(f"system {i} ({a.get_chemical_formula()}, {t:g} K, {trajs[i]}): ", end="")
    if r.stopped:
      print(f"left the batch: {r.reason}; frames up to it are in {trajs[i]}")
      continue
    _summary(r.log, len(a), wall, done, args.dt, nve)
  print(
    f"all: {done} steps x {len(systems)} systems in {wall:.1f} s: "
    f"{sum(r.steps * len(a) for r, a in zip(results, systems)) / wall:.3g} atom-steps/s, "
    f"{done / wall * args.dt * 1e-6 * 86400:.3g} ns/day per system"
  )
  stopped = [i for i, r in enumerate(results) if r.stopped]
  if stopped:
    print(
      f"eqattn md: system {stopped[0]}: {results[stopped[0]].reason}"
      + (f" (and {len(stopped) - 1} more)" if len(stopped) > 1 else ""),
      file=sys.stderr,
    )
    return RUNAWAY_STATUS
  return 0


def _run_md(md, args, atoms, pot, ensemble, steps, out, bar):
  limits = dict(max_temperature=args.max_temperature, max_force=args.max_force)
  if args.max_force_uncertainty is not None and args.engine != "jax-md":
    raise UsageError("--max-force-uncertainty is checked by the jax-md engine")
  if args.engine == "jax-md":
    options = _md_options(
      md,
      args,
      ensemble=ensemble,
      steps=steps,
      temperature=args.temperature,
      seed=args.seed,
      traj=str(out),
      log_file=str(out.with_suffix(".csv")),
    )
    return md.run(atoms, pot, options, progress=bar)
  from plugin.ase import Calculator

  return md.run_ase(
    atoms,
    Calculator(pot),
    ensemble=ensemble.name,
    timestep=args.dt,
    steps=steps,
    temperature=args.temperature,
    seed=args.seed,
    interval=args.traj_interval or args.log_interval or min(DEFAULTS.chunk, steps),
    traj=str(out),
    log_file=str(out.with_suffix(".csv")),
    progress=bar.update,
    **limits,
  )


def _md_options(md, args, *, ensemble, steps, temperature, seed, traj, log_file):
  """The run's :class:`plugin.md.MDOptions` from the command line, made once."""
  return md.MDOptions(
    ensemble=ensemble.name,
    temperature=temperature,
    timestep=args.dt,
    total_steps=steps,
    traj=traj,
    resume=args.resume,
    log_file=log_file,
    seed=seed,
    chunk=min(md.DEFAULTS.chunk, steps),
    pressure=args.pressure,
    log_interval=args.log_interval,
    traj_interval=args.traj_interval,
    max_temperature=args.max_temperature,
    max_force=args.max_force,
    max_uncertainty=args.max_force_uncertainty,
    uncertainty_action="flag" if args.flag_uncertainty else "stop",
  )


def _rates(wall: float, steps: int, dt: float, n: int, chunk_times=None, chunk=None) -> str:
  """The run's speed: after the first chunk (which compiles) the steady rate in steps/s,
  ns/day and µs/atom/step, and the start-up apart; one chunk only: its overall rate."""
  if chunk_times and len(chunk_times) > 1 and chunk:
    steady = (steps - min(chunk, steps)) / max(sum(chunk_times[1:]), 1e-9)
    start = wall - sum(chunk_times[1:])
    return (
      f"done: {steps} steps in {wall:.1f} s (start-up and compilation {start:.1f} s); steady "
      f"{steady:.1f} steps/s, {steady * dt * 1e-6 * 86400:.3g} ns/day, "
      f"{1e6 / (steady * n):.3g} µs/atom/step"
    )
  return (
    f"done: {steps} steps in {wall:.1f} s ({steps / wall:.1f} steps/s, "
    f"{steps / wall * dt * 1e-6 * 86400:.3g} ns/day, compilation included)"
  )


def _summary(log, n, wall, steps, dt, nve: bool, chunk_times=None, chunk=None):
  import numpy as np
  from plugin.testing import drift_statistics

  line = (
    f"{_rates(wall, steps, dt, n, chunk_times, chunk)}; mean T {np.mean(log.temperature):.1f} K"
  )
  if nve and len(log.time_ps) >= 3:
    slope, err, rms = drift_statistics(log.time_ps, log.etot / n)
    line += f"; total-energy drift {slope:+.3f} ± {err:.3f} meV/atom/ps, RMS {rms:.3f} meV/atom"
  print(line)


def _plot_md(log, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  ax[0].plot(log.time_ps, log.etot, label="total")
  ax[0].plot(log.time_ps, log.epot, label="potential")
  ax[0].set_ylabel("energy (eV)")
  ax[0].legend()
  ax[1].plot(log.time_ps, log.temperature)
  ax[1].set_ylabel("T (K)")
  ax[1].set_xlabel("time (ps)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- other commands
def cmd_info(args) -> int:
  pot = _load_model(args.model)
  if args.json:
    info = {
      "species": list(pot.symbols),
      "cutoff_A": pot.cutoff,
      "config": pot.config.to_dict(),
      "element_shifts_eV": dict(zip(pot.symbols, map(float, pot.element_shifts))),
      "metadata": dict(pot.metadata),
    }
    print(json.dumps(info, indent=2, default=str))
  else:
    print(_info_summary(pot, args.model))
  return 0


def _info_summary(pot, name: str) -> str:
  """A few lines a person reads: what the model is, how it was trained, its held-out errors
  (meV, meV/Å)."""
  c, meta = pot.config, pot.metadata
  members = f"; ensemble of {pot.num_members}" if pot.num_members > 1 else ""
  lines = [
    f"{name}: {' '.join(pot.symbols)}, cutoff {pot.cutoff:g} Å, {c.num_iterations} attention "
    f"blocks, {c.features} features, max degree {c.max_degree}{members}",
  ]
  training = meta.get("training", {})
  if training:
    minutes = training.get("seconds", 0.0) / 60
    made = meta.get("provenance", {})
    how = ", ".join(
      x for x in (made.get("command"), made.get("stage") and f"stage {made['stage']}") if x
    )
    lines.append(
      f"trained {training.get('epochs_run', '?')} epochs on {training.get('frames', '?')} "
      f"frames in {minutes:.0f} min" + (f" ({how})" if how else "")
    )
  for key, what in (
    ("test_metrics", "held-out trajectories"),
    ("test_random_metrics", "random training frames"),
  ):
    m = meta.get(key)
    if m:
      lines.append(
        f"{what}: forces MAE {1e3 * m['forces_mae']:.1f} meV/Å, energy MAE "
        f"{1e3 * m['energy_mae']:.2f} meV ({1e3 * m['energy_per_atom_mae']:.2f} meV/atom)"
      )
  lines += _learn_summary(meta.get("learn"))
  lines.append("(all fields: eqattn info --json)")
  return "\n".join(lines)


def _learn_summary(learn) -> list:
  """How `eqattn learn` made the model: reference, calls, rounds, the last check."""
  if not learn:
    return []
  out = [
    f"learnt from {learn['reference_calls']} {learn['reference']} calls "
    f"({learn['failed_calls']} failed) in {learn['rounds']} rounds, {learn['minutes']:.0f} min, "
    f"stopped: {learn['stop_reason']}"
  ]
  for kind, m in (learn.get("last_next_round") or {}).items():
    if m:
      out.append(
        f"last round, before training on it ({kind}ed frames): forces MAE "
        f"{m['forces_mae_meV_A']:.1f} meV/Å, energy MAE {m['energy_mae_meV_atom']:.2f} meV/atom"
      )
  if learn.get("test"):
    out.append(f"test file: forces MAE {learn['test']['forces_mae_meV_A']:.1f} meV/Å")
  return out


def cmd_eval(args) -> int:
  from potentials import training
  from plugin.data import read_frames

  pot = _load_model(args.model)
  if not Path(args.data).exists():
    raise UsageError(f"data file {args.data!r} does not exist")
  try:
    frames = read_frames(args.data, pot.cutoff, index=args.index)
  except ValueError as e:
    raise UsageError(str(e)) from None
  for f in frames:
    _check_species(pot, f.numbers)
  print(f"{len(frames)} frames from {args.data}")
  print(
    "| frames | n | energy MAE (meV) | meV/atom | forces MAE (meV/Å) | forces RMSE "
    "| stress MAE (meV/Å³) |"
  )
  print("|---|---|---|---|---|---|---|")
  for label, subset in _eval_groups(pot, frames):
    m = training.error_metrics(pot, subset)
    cell = lambda key: f"{m[key] * 1e3:.3f}" if key in m else "—"
    print(
      f"| {label} | {len(subset)} | {cell('energy_mae')} | {cell('energy_per_atom_mae')} | "
      f"{cell('forces_mae')} | {cell('forces_rmse')} | {cell('stress_mae')} |"
    )
  if args.parity:
    _parity_plot(pot, frames, args.parity)
    print(f"parity plot written to {args.parity}")
  return 0


def _eval_groups(pot, frames):
  """All frames; then, where the model file records its split and the frames carry
  trajectory tags: the test trajectories (never used in training: the file's test figures),
  the validation ones (they chose the kept weights), the training ones, and the test ones
  per temperature."""
  yield "all", frames
  parts = pot.metadata.get("training", {}).get("split_parts", {})
  named = lambda part: set(parts.get(part, {}).get("trajectories", []))
  seen, valid, test = named("train"), named("valid"), named("test")
  if not seen or all(f.trajectory is None for f in frames):
    return
  held = [f for f in frames if f.trajectory is not None and f.trajectory not in seen]
  if test and valid:
    held = [f for f in held if f.trajectory in test]
    yield "test trajectories", held
    yield "validation trajectories", [f for f in frames if f.trajectory in valid]
  else:  # a split recorded without its parts: everything not trained on
    yield "held-out trajectories", held
  yield "training trajectories", [f for f in frames if f.trajectory in seen]
  for t in sorted({f.temperature for f in held if f.temperature is not None}):
    yield (
      f"{'test' if test and valid else 'held-out'}, {t:g} K",
      [f for f in held if f.temperature == t],
    )


def _parity_plot(pot, frames, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  ref_f, pred_f, ref_e, pred_e = [], [], [], []
  for f in frames:
    e, forces = pot.energy_and_forces(f.numbers, f.positions, f.dst, f.src, f.shifts, f.cell)
    if f.forces is not None:
      ref_f.append(f.forces.ravel())
      pred_f.append(forces.ravel())
    if f.energy is not None:
      ref_e.append(f.energy / f.num_atoms)
      pred_e.append(e / f.num_atoms)
  fig, ax = plt.subplots(1, 2, figsize=(9, 4))
  for a, (r, p, label) in zip(
    ax, ((ref_e, pred_e, "energy per atom (eV)"), (ref_f, pred_f, "force component (eV/Å)"))
  ):
    if not r:
      continue
    r = np.concatenate([np.atleast_1d(x) for x in r])
    p = np.concatenate([np.atleast_1d(x) for x in p])
    a.plot(r, p, ".", ms=2)
    lim = [min(r.min(), p.min()), max(r.max(), p.max())]
    a.plot(lim, lim, "k--", lw=1)
    a.set_xlabel(f"reference {label}")
    a.set_ylabel(f"model {label}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def cmd_train(args) -> int:
  import potentials
  from potentials import training
  from plugin.data import read_frames

  if not Path(args.data).exists():
    raise UsageError(f"data file {args.data!r} does not exist")
  _check_writable(Path(args.out), "--out", overwrite=args.force)
  own_checkpoint = not args.checkpoint  # beside --out by default, removed once it is written
  args.checkpoint = args.checkpoint or f"{args.out}.ckpt"
  _check_writable(Path(args.checkpoint), "--checkpoint", overwrite=True)
  if Path(args.checkpoint).exists() or Path(f"{args.checkpoint}.0").exists():
    print(f"eqattn train: resuming from {args.checkpoint} with the time it had left", flush=True)
  try:
    pot = _initial_model(args)
    frames = read_frames(args.data, pot.cutoff, charge=args.charge)
    for f in frames:
      _check_species(pot, f.numbers)
    given = {
      "epochs": args.epochs,
      "time_limit": args.time_limit,
      "batch_size": args.batch_size,
      "learning_rate": args.lr,
      "split": args.split,
    }
    extra = json.loads(args.train_config) if args.train_config else {}
    tcfg = training.TrainConfig(
      **{**extra, **{k: v for k, v in given.items() if v is not None}, "seed": args.seed}
    )
  except (ValueError, TypeError) as e:
    raise UsageError(str(e)) from None
  common = dict(checkpoint=args.checkpoint, progress=True, started=args.started)
  try:
    if args.committee:
      result = training.train_committee(pot, frames, tcfg, members=args.committee, **common)
    else:
      result = training.train(pot, frames, tcfg, fine_tune=bool(args.init), **common)
  except potentials.CheckpointError as e:
    raise UsageError(str(e)) from None
  out = Path(args.out)
  result.potential.replace(
    metadata={**result.potential.metadata, "provenance": {"data": str(args.data)}}
  ).save(out)
  if own_checkpoint:  # the model is written: the run's checkpoint(s) have done their job
    ckpt = Path(args.checkpoint)
    for path in [ckpt, *ckpt.parent.glob(f"{ckpt.name}.*")]:
      path.unlink(missing_ok=True)
  print(_train_report(result, tcfg))
  print(f"model written to {out}")
  if "test_uncertainty" in result.potential.metadata:
    print("uncertainty on the test frames (calibrated on the validation frames):")
    print(json.dumps(result.potential.metadata["test_uncertainty"], indent=1))
  return 0


def _check_writable(path: Path, option: str, *, overwrite: bool) -> None:
  """Before any work: ``path``'s folder exists and is writable, and an existing file is only
  replaced when ``overwrite``."""
  try:
    check_writable_folder(path, option)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if path.exists() and not overwrite:
    raise UsageError(f"{option} {path} exists: pass --force to replace it, or choose another path")


def _train_report(result, config) -> str:
  """What was trained (epochs, minutes, schedule) and the held-out figures in meV."""
  info = result.potential.metadata["training"]
  budget = config.budget_minutes
  lines = [
    f"trained {info['epochs_run']} epochs in {info['seconds'] / 60:.1f} min"
    + (f" of a {budget:g}-minute budget" if budget else "")
    + f" ({info['optimisation_seconds'] / 60:.1f} min of optimisation steps); lr "
    f"{config.learning_rate:g} -> {config.learning_rate * config.final_lr_fraction:g} "
    f"({config.schedule}), EMA {config.ema_decay:g}"
  ]
  for key, name in (("test", "held-out trajectories"), ("test_random", "random training frames")):
    m = result.metrics.get(key) or {}
    if m:
      row = f"{name}: forces MAE {1e3 * m.get('forces_mae', float('nan')):.1f} meV/Å"
      if "energy_mae" in m:
        row += f", energy MAE {1e3 * m['energy_mae']:.2f} meV"
        row += f" ({1e3 * m['energy_per_atom_mae']:.2f} meV/atom)"
      if "stress_mae" in m:
        row += f", stress MAE {1e3 * m['stress_mae']:.3f} meV/Å³"
      lines.append(row)
  return "\n".join(lines)


def _initial_model(args):
  """A fresh model from --species and the architecture options, or --init's trained one."""
  import potentials

  if not args.init:
    if not args.species:
      raise UsageError("train needs --species (element symbols), or --init MODEL to fine-tune")
    hyper = json.loads(args.model_config) if args.model_config else {}
    if args.cutoff is not None:
      hyper["cutoff"] = args.cutoff
    if args.readout_heads is not None:
      hyper["readout_heads"] = args.readout_heads
    if args.force_heads:
      hyper["force_heads"] = True
    if args.electrostatics:
      hyper["electrostatics"] = True
    heads = hyper.get("readout_heads", hyper.get("heads", 1))
    if hyper.get("force_heads") and (args.committee or heads < 2):
      raise UsageError(
        "--force-heads reads out the members of a shallow ensemble: use it with --readout-heads K "
        "(K >= 2), not with --committee"
      )
    return potentials.Potential.create(args.seed, species=args.species, **hyper)
  fixed = [
    o
    for o, v in (
      ("--model-config", args.model_config),
      ("--cutoff", args.cutoff),
      ("--readout-heads", args.readout_heads),
      ("--force-heads", args.force_heads),
      ("--committee", args.committee),
      ("--electrostatics", args.electrostatics),
    )
    if v
  ]
  if fixed:
    raise UsageError(f"--init fine-tunes a trained model of fixed architecture; drop {fixed}")
  pot = _load_model(args.init)
  if args.species and list(args.species) != list(pot.species):
    raise UsageError(f"--species {args.species} differs from {args.init}'s {pot.species}")
  return pot


def cmd_select(args) -> int:
  """The frames of a trajectory where the ensemble is least sure, for labelling."""
  import ase.io
  import numpy as np

  from plugin.ase import Calculator
  from plugin.data import read_images

  pot = _load_model(args.model)
  if pot.num_members == 1:
    raise UsageError(
      f"{args.model} is a single model; selection needs an ensemble (train one with "
      "eqattn train ... --readout-heads 4 or --committee 4)"
    )
  try:
    frames = read_images(args.traj)
  except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error
    raise UsageError(f"cannot read {args.traj}: {e}") from None
  calc = Calculator(pot)
  scores = []
  for atoms in frames:
    _check_species(pot, atoms.numbers)
    atoms = atoms.copy()
    atoms.calc = calc
    scores.append(float(np.max(calc.get_property("forces_uncertainty", atoms))))
  picked = sorted(np.argsort(scores, kind="stable")[::-1][: args.n])  # in trajectory order
  out = []
  for i in picked:
    a = frames[i].copy()  # positions, cell, numbers only: the model's values are no labels
    a.calc = None
    a.info = {k: v for k, v in a.info.items() if isinstance(v, (int, float, str))}
    a.info.update(source=str(args.traj), source_index=int(i), max_force_uncertainty=scores[i])
    out.append(a)
  ase.io.write(args.out, out, format="extxyz")
  print(
    f"{len(out)} of {len(frames)} frames written to {args.out} (max force uncertainty "
    f"{min(scores[i] for i in picked):.3g}..{max(scores):.3g} eV/Å); label them and add "
    f"them to the training data"
  )
  return 0


def cmd_check_conservation(args) -> int:
  from plugin.ase import Calculator
  from plugin.testing import check_energy_conservation

  pot = _load_model(args.model)
  atoms = _read_structure(args.structure)
  _check_species(pot, atoms.numbers)
  report = check_energy_conservation(
    atoms,
    Calculator(pot),
    temperature=args.temperature,
    timestep=args.dt,
    duration=args.time,
    warmup=min(0.1 * args.time, 1.0),
    check_order=args.order,
  )
  print(report.summary())
  if args.plot:
    report.plot(args.plot)
    print(f"plot written to {args.plot}")
  return 0


def cmd_learn(args) -> int:
  from plugin.learn import command

  try:
    prepared = command.prepare(args)
  except ValueError as e:  # UnknownElementError too
    raise UsageError(str(e)) from None
  return command.run(prepared, args)


def cmd_lammps(args) -> int:
  from plugin.lammps.driver import run_args

  return run_args(args, cache=not args.no_cache)


# ----------------------------------------------------------------------------- parser
class _Formatter(argparse.HelpFormatter):
  """Help that shows each option's default (where it has one worth showing)."""

  def _get_help_string(self, action):
    text = action.help or ""
    shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
    if shown and "%(default)" not in text and "default" not in text:
      text += " (default: %(default)s)"
    return text


def _version() -> str:
  from importlib import metadata

  try:
    return metadata.version("eqattn")
  except metadata.PackageNotFoundError:  # run from a source tree without installing
    return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog="eqattn",
    description="E(3)-equivariant self-attention potentials: MD, training, evaluation.",
  )
  ap.add_argument("--version", action="version", version=f"eqattn {_version()}")
  sub = ap.add_subparsers(dest="command", required=True)

  _add_md(sub)
  _add_train(sub)
  _add_learn(sub)
  _add_tools(sub)

  for command in sub.choices.values():
    command.add_argument(
      "--no-cache",
      action="store_true",
      help="do not use the compilation cache (see EQATTN_CACHE_DIR below)",
    )
    command.epilog = _CACHE_HELP
    command.formatter_class = _Formatter
  return ap


def _add_learn(sub) -> None:
  from plugin.learn.command import add_arguments

  p = sub.add_parser(
    "learn", help="learn a potential for your own system from a reference (active learning)"
  )
  add_arguments(p, temperatures=_temperature_list, positive=_positive)
  p.set_defaults(func=cmd_learn)


def _add_md(sub) -> None:
  md = sub.add_parser("md", help="run molecular dynamics (default: ethanol, 300 K)")
  md.add_argument(
    "structure",
    nargs="*",
    help="ASE-readable files (default: ethanol); several run together in one program",
  )
  md.add_argument(
    "--replicas",
    type=_positive(int),
    metavar="N",
    help="run N copies of each structure together, seeds --seed, --seed + 1, ...",
  )
  md.add_argument(
    "--temperatures",
    type=_temperature_list,
    metavar="T1,T2,...",
    help="one copy of each structure per temperature (K), run together",
  )
  md.add_argument("--model", default=DEFAULT_MODEL, help="shipped model name or .eqm path")
  md.add_argument(
    "--ensemble",
    choices=list(CLI_ENSEMBLES),
    default=DEFAULTS.command_ensemble,
    help="thermodynamic ensemble (nvt: Langevin thermostat; npt: needs a periodic cell)",
  )
  md.add_argument("--temperature", type=_positive(float), default=DEFAULTS.temperature, help="K")
  md.add_argument("--dt", type=_positive(float), default=DEFAULTS.timestep, help="timestep in fs")
  md.add_argument(
    "--pressure", type=float, default=DEFAULTS.pressure, help="bar, the NPT target (--ensemble npt)"
  )
  g = md.add_mutually_exclusive_group()
  g.add_argument("--steps", type=_positive(int), help="steps to run (instead of --time)")
  g.add_argument(
    "--time", type=_positive(float), default=DEFAULTS.duration, help="ps (default %(default)g)"
  )
  md.add_argument(
    "--charge",
    type=_finite,
    help="total charge (e) of the structures, for a model with electrostatics (default: "
    "the file's info['charge'], else 0)",
  )
  md.add_argument(
    "--ewald-accuracy",
    type=float,
    help="truncation of the Ewald sums of a model with electrostatics, in (0, 1) (default: the "
    "model file's, usually 1e-6)",
  )
  md.add_argument(
    "--engine",
    choices=["jax-md", "ase"],
    default="jax-md",
    help="jax-md: compiled chunks (fast); ase: ASE's integrators with the calculator",
  )
  md.add_argument(
    "--out",
    help="trajectory file, format by extension: .traj (default "
    "md.traj), .extxyz/.xyz, .h5/.h5md (H5MD, needs h5py)",
  )
  md.add_argument(
    "--log-interval",
    type=_positive(int),
    metavar="STEPS",
    help="steps between rows of the log (OUT with .csv: step, time, energies, temperature, "
    f"pressure; default {DEFAULTS.chunk}, or the run's length if shorter)",
  )
  md.add_argument(
    "--traj-interval",
    type=_positive(int),
    metavar="STEPS",
    help="steps between trajectory frames (default: --log-interval); the first and last "
    "steps are always written",
  )
  md.add_argument("--plot", help="write a PNG of energies and temperature")
  md.add_argument(
    "--seed", type=int, default=DEFAULTS.seed, help="start velocities and Langevin noise"
  )
  md.add_argument(
    "--resume",
    action="store_true",
    help="continue the trajectory in --out from its last frame (jax-md engine)",
  )
  _add_md_guards(md)
  md.set_defaults(func=cmd_md)


def _add_md_guards(md) -> None:
  """The runaway and uncertainty guards of ``eqattn md``."""
  md.add_argument(
    "--max-temperature",
    type=_positive(float),
    metavar="K",
    help=f"stop (exit status {RUNAWAY_STATUS}, last good frame kept) above this "
    f"temperature; default max({DEFAULTS.max_temperature_factor:g} x target, "
    f"{DEFAULTS.max_temperature_floor:g} K); inf: off",
  )
  md.add_argument(
    "--max-force",
    type=_positive(float),
    metavar="EV_PER_A",
    default=DEFAULTS.max_force,
    help="stop when a force exceeds this (eV/Å); default off. Non-finite "
    "positions, forces or energies always stop the run",
  )
  md.add_argument(
    "--max-force-uncertainty",
    type=_positive(float),
    metavar="EV_PER_A",
    help="ensemble models: stop (exit status "
    f"{RUNAWAY_STATUS}, that frame written, the atoms named; one system of several leaves the "
    "batch and the others go on) when an atom's calibrated "
    f"force uncertainty exceeds this (eV/Å), checked every {DEFAULTS.chunk} steps",
  )
  md.add_argument(
    "--flag-uncertainty",
    action="store_true",
    help="with --max-force-uncertainty: only report the steps and atoms, do not stop",
  )


def _add_train(sub) -> None:
  tr = sub.add_parser("train", help="fit a model to an ASE-readable dataset")
  tr.add_argument("data")
  tr.add_argument("--species", nargs="+", help="element symbols (a new model needs them)")
  tr.add_argument(
    "--init",
    metavar="MODEL",
    help="fine-tune: start from this trained model's weights (name or file) instead of a "
    "fresh initialisation; its architecture and species are kept",
  )
  tr.add_argument("--cutoff", type=_positive(float), help="Å (default: ModelConfig's, 5)")
  tr.add_argument("--model-config", help="JSON of model hyperparameters, e.g. '{\"features\": 32}'")
  # training defaults live in potentials.training.TrainConfig; options only override them
  tr.add_argument(
    "--epochs", type=_positive(int), help="at most this many epochs (default: no cap)"
  )
  tr.add_argument(
    "--time-limit",
    type=_positive(float),
    metavar="MINUTES",
    help="wall-clock budget of the whole command (training, evaluation, calibration); the "
    "learning-rate schedule is fitted to it and the best weights are saved (default: "
    f"{DEFAULT_TRAIN_MINUTES:g} minutes unless --epochs is given)",
  )
  tr.add_argument(
    "--batch-size",
    type=_positive(int),
    help="frames per batch (default: as many as hold about "
    f"{TRAIN_HELP_DEFAULTS['pairs_per_batch']} neighbour pairs, 1 to "
    f"{TRAIN_HELP_DEFAULTS['max_auto_batch']} frames)",
  )
  tr.add_argument(
    "--lr",
    type=_positive(float),
    help=f"peak learning rate (default {TRAIN_HELP_DEFAULTS['learning_rate']:g})",
  )
  tr.add_argument(
    "--split",
    choices=["trajectory", "random"],
    help="hold out whole trajectories (default) or random frames",
  )
  tr.add_argument(
    "--train-config", help="JSON of other TrainConfig fields, e.g. '{\"forces_weight\": 10}'"
  )
  ens = tr.add_mutually_exclusive_group()
  ens.add_argument(
    "--readout-heads",
    type=_positive(int),
    metavar="K",
    help="shallow ensemble: K readout heads on one network (one training, one forward pass)",
  )
  ens.add_argument(  # its old name, which read as the attention's heads
    "--heads", type=_positive(int), dest="readout_heads", action=_Deprecated, help=argparse.SUPPRESS
  )
  ens.add_argument(
    "--committee",
    type=_positive(int),
    metavar="K",
    help="committee: K independently trained models in one file (K x the cost); "
    "--time-limit is shared between them",
  )
  ens.add_argument(  # its old name, which `eqattn md --ensemble` means otherwise
    "--ensemble",
    type=_positive(int),
    dest="committee",
    action=_Deprecated,
    help=argparse.SUPPRESS,
  )
  tr.add_argument(
    "--force-heads",
    action="store_true",
    help="with --readout-heads: every head also reads out its member's force deviation, so the "
    "force uncertainty costs no backward pass per head (fitting the readout takes 2 more "
    "minutes after --time-limit; TrainConfig.readout_minutes)",
  )
  tr.add_argument(
    "--electrostatics",
    action="store_true",
    help="learnt charges with long-range electrostatics (open sum, or Ewald/PME in periodic "
    "cells), trained from energies and forces alone; for single models",
  )
  tr.add_argument(
    "--charge",
    type=_finite,
    default=0.0,
    help="total charge (e) of frames whose info has no 'charge' (default 0)",
  )
  tr.add_argument("--seed", type=int, default=0)
  tr.add_argument(
    "--checkpoint",
    help="checkpoint file, written after every epoch and resumed if it exists (default: "
    "OUT.ckpt, removed once the model is written: rerunning an interrupted command resumes it)",
  )
  tr.add_argument("--out", default="model.eqm", help="model file (default: model.eqm)")
  tr.add_argument("--force", action="store_true", help="replace --out if it exists")
  tr.set_defaults(func=cmd_train)


def _add_tools(sub) -> None:
  """eval, check-conservation, info, lammps."""
  ev = sub.add_parser("eval", help="MAE/RMSE of a model on a dataset")
  ev.add_argument("model")
  ev.add_argument("data")
  ev.add_argument("--index", default=":", help="ASE index of frames to use (default all)")
  ev.add_argument("--parity", help="write a parity plot PNG")
  ev.set_defaults(func=cmd_eval)

  cc = sub.add_parser("check-conservation", help="NVE energy-conservation report")
  cc.add_argument("model")
  cc.add_argument("structure")
  cc.add_argument("--temperature", type=_positive(float), default=DEFAULTS.temperature)
  cc.add_argument("--dt", type=_positive(float), default=DEFAULTS.timestep)
  cc.add_argument("--time", type=_positive(float), default=DEFAULTS.duration, help="ps")
  cc.add_argument("--order", action="store_true", help="also check the dt-halving ratio")
  cc.add_argument("--plot")
  cc.set_defaults(func=cmd_check_conservation)

  sel = sub.add_parser(
    "select", help="the frames of a trajectory an ensemble is least sure of (to label)"
  )
  sel.add_argument("traj", help="any ASE-readable trajectory")
  sel.add_argument("--model", required=True, help="an ensemble model (.eqm)")
  sel.add_argument("--n", type=_positive(int), default=50, help="frames to pick (default 50)")
  sel.add_argument("--out", default="selected.extxyz")
  sel.set_defaults(func=cmd_select)

  info = sub.add_parser("info", help="what a model is, how it was trained, its held-out errors")
  info.add_argument("model")
  info.add_argument(
    "--json", action="store_true", help="every field (config, shifts, metadata) as JSON, in eV"
  )
  info.set_defaults(func=cmd_info)

  lmp = sub.add_parser(
    "lammps",
    help="run a LAMMPS input with pair_style eqattn (run it "
    "under mpirun for MPI; needs the lammps extra)",
  )
  from plugin.lammps.driver import add_arguments

  add_arguments(lmp)
  lmp.set_defaults(func=cmd_lammps)


_CACHE_HELP = (
  f"Compiled programs are cached in {cache.ENV_VAR} if set (empty or 0/off "
  f"disables), else $XDG_CACHE_HOME/eqattn or ~/.cache/eqattn, so a second run "
  f"starts in seconds."
)


def _enable_cache(args) -> None:
  if args.no_cache:
    return
  try:
    cache.enable_compilation_cache()
  except OSError as e:  # e.g. a read-only home: run without, say why
    print(f"eqattn: compilation cache off ({e})", file=sys.stderr)


def _check_plotting(args) -> None:
  if getattr(args, "plot", None) or getattr(args, "parity", None):
    try:
      import matplotlib  # noqa: F401
    except ImportError:
      raise UsageError("plots need matplotlib: pip install 'eqattn[plot]'") from None


class _Deprecated(argparse.Action):
  """An option's old name: it still works, with a warning naming the new one (removal: the
  version CHANGELOG.md lists)."""

  def __call__(self, parser, namespace, values, option_string=None):
    from potentials.deprecation import REMOVAL

    new = "--" + self.dest.replace("_", "-")
    msg = f"eqattn: {option_string} is deprecated here, use {new} (removed in {REMOVAL})"
    print(msg, file=sys.stderr)
    setattr(namespace, self.dest, values)


def main(argv: Optional[List[str]] = None) -> int:
  jax_md_import.install()  # this process is eqattn's own: JAX-MD's submodules on first use
  started = STARTED if argv is None else time.perf_counter()
  args = build_parser().parse_args(argv)
  args.started = started
  main_thread = threading.current_thread() is threading.main_thread()
  old = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
  try:
    _check_plotting(args)
    _enable_cache(args)
    return args.func(args)
  except UsageError as e:
    print(f"eqattn {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ninterrupted; {_continue_hint(args)}", file=sys.stderr)
    return 130
  except _Terminated:
    print(f"\nterminated (SIGTERM); {_continue_hint(args)}", file=sys.stderr)
    return 143
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, old)


def _continue_hint(args) -> str:
  if args.command == "learn":
    return f"rerun the same command with --resume to continue in {args.out}"
  if args.command == "train":
    if getattr(args, "checkpoint", None):
      return f"rerun the same command to continue from {args.checkpoint} with the time left"
    return "nothing was saved yet"
  return "files written so far are kept (continue with --resume)"


class _Terminated(Exception):
  """SIGTERM (a batch system's time limit): ends `main` like Ctrl-C does. Trajectory writers
  hold the signal while a frame is written (plugin.md.output), so it lands between frames."""


def _on_sigterm(signum, frame):
  raise _Terminated()


if __name__ == "__main__":
  sys.exit(main())
