"""``learn``: a validated potential for the user's own system from any reference.

::

    from plugin.learn import learn, LearnOptions
    result = learn([atoms], out="learn", options=LearnOptions(reference="gfn2",
                   temperatures=(300, 600), time_limit=60))
    result.potential          # the model (also learn/model.eqm)
    result.report["rounds"]   # per round: labels, uncertainty, next-round and test errors

Files in ``out``: ``labels.extxyz`` (every reference call's label as it arrived, with
``info`` reference/round/source), ``failures.jsonl``, ``model.eqm`` (provenance in its
metadata under ``"learn"``), ``report.json``, ``learn.png`` (errors and uncertainty against
reference calls, with matplotlib), ``state.json`` and ``explore/`` (the rounds' MD).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from ase import Atoms

import potentials
from plugin.data import frame_from_atoms, read_images
from plugin.paths import check_writable_folder

from . import loop
from .labels import LabelError, LabelFile, LabelPool
from .options import LearnOptions
from .state import LearnState, differences

REPORT, PLOT = "report.json", "learn.png"


@dataclasses.dataclass
class LearnResult:
  """The learnt potential, the run's report (``report.json``'s content) and its folder."""

  potential: potentials.Potential
  report: dict
  folder: Path


def learn(
  starts: Union[Atoms, Sequence[Atoms]],
  *,
  out,
  options: Optional[LearnOptions] = None,
  reference=None,
  resume: bool = False,
  test: Optional[Sequence[Atoms]] = None,
  log: Callable[[str], None] = print,
  **overrides,
) -> LearnResult:
  """Learn a potential for ``starts`` from a reference, within ``options.time_limit``.

  Args:
    starts: one or more start structures (the model's species are theirs).
    out: the run's folder (created; an existing run there needs ``resume=True``).
    options: :class:`LearnOptions` (``overrides``: any of its fields).
    reference: an ASE calculator object to use instead of ``options.reference`` (labelled
      in this process: no worker processes, no timeout); ``options.reference`` then only
      names it in the labels.
    resume: continue the run in ``out``; refused, naming the difference, if the reference or
      an option that shapes the data changed.
    test: labelled structures (a calculator with energy and forces attached) to evaluate
      every model on.
    log: receives one line per round.
  """
  options = dataclasses.replace(options or LearnOptions(), **overrides)
  starts = [starts] if isinstance(starts, Atoms) else list(starts)
  folder = Path(out)
  state = open_run(folder, options, starts, resume)
  workers = 0 if reference is not None else options.workers
  with LabelPool(reference if reference is not None else options.reference, workers,
                 options.label_timeout) as pool:  # fmt: skip
    ctx = loop.Context(
      options=options,
      folder=folder,
      starts=starts,
      pool=pool,
      labels=LabelFile(folder / loop.LABELS),
      reference_name=options.reference,
      test=_test_frames(test, options),
      log=log,
      started=time.perf_counter(),
      elapsed_before=state.elapsed_s,
    )
    potential = _drive(ctx, state)
  report = write_report(ctx, state)
  potential = potential.replace(metadata={**potential.metadata, "learn": provenance(report)})
  potential.save(folder / loop.MODEL)
  return LearnResult(potential=potential, report=report, folder=folder)


def _drive(ctx: loop.Context, state: LearnState) -> potentials.Potential:
  """The loop from wherever ``state`` stands."""
  try:
    loop.isolated_atoms(ctx, state)
  except LabelError as e:  # a reference without lone atoms (a periodic-only code) still works
    state.isolated_atoms = {"error": str(e)}
  if not state.rounds and state.current is None:
    loop.seed_round(ctx, state)
  model = ctx.folder / loop.MODEL
  potential = potentials.load(model) if state.rounds else None
  if state.current is not None:  # a round cut by a kill: its labels, check and training
    potential = loop.finish_round(ctx, state, potential)
  while state.stop_reason is None:
    state.stop_reason = loop.explore_round(ctx, state, potential)
    if state.stop_reason is None:
      potential = loop.finish_round(ctx, state, potential)
    loop.save(ctx, state)
  if state.final is None:
    potential = loop.final_training(ctx, state, potential)
  return potential


def check_run(folder: Path, options: LearnOptions, starts: List[Atoms], resume: bool):
  """Before any work: the starts' species are elements a model can have, the folder is
  writable, and a run already there is resumed only with the same settings. Returns the
  saved state (None for a new run); ValueError naming the fix otherwise."""
  if not starts:
    raise ValueError("learn needs at least one start structure")
  species = sorted({int(z) for a in starts for z in a.numbers})
  if species[0] < 1:
    raise ValueError(f"start structures hold atomic number {species[0]}: not an element")
  # the run's folder is made if missing: its parent must take it (or it must take files)
  check_writable_folder(folder / "state.json" if folder.is_dir() else folder, "--out")
  if not (folder / "state.json").exists():
    if (folder / loop.LABELS).exists():
      raise ValueError(f"{folder} holds labels but no state.json: choose a new folder")
    return None
  if not resume:
    raise ValueError(f"{folder} holds a learning run: resume it (--resume) or choose a new folder")
  state = LearnState.load(folder)
  changed = differences(state.fingerprint, options.fingerprint())
  if state.species != species:
    changed.append(f"species: {state.species} -> {species}")
  if changed:
    raise ValueError(
      f"{folder} was learnt with other settings ({'; '.join(changed)}): resume with the "
      "same reference and options, or start a new folder"
    )
  return state


def open_run(folder: Path, options: LearnOptions, starts: List[Atoms], resume: bool):
  """The state of the run in ``folder`` (checked), or of a new one there."""
  state = check_run(folder, options, starts, resume)
  if state is not None:
    return state
  if resume:
    print(f"learn: nothing to resume in {folder}; starting a new run")
  folder.mkdir(parents=True, exist_ok=True)
  species = sorted({int(z) for a in starts for z in a.numbers})
  state = LearnState(fingerprint=options.fingerprint(), species=species)
  state.save(folder)
  return state


def _test_frames(test, options) -> Optional[list]:
  if test is None:
    return None
  cutoff = potentials.ModelConfig(**options.model).cutoff
  return [frame_from_atoms(a, cutoff) for a in test]


def read_test(path) -> List[Atoms]:
  """A user's labelled test file (any ASE-readable format with energies and forces)."""
  frames = read_images(path)
  if not frames or any(a.calc is None for a in frames):
    raise ValueError(f"test file {path}: every frame needs energy and forces (reference labels)")
  return frames


def write_report(ctx: loop.Context, state: LearnState) -> dict:
  """``report.json`` (and ``learn.png`` with matplotlib) from the state and the labels."""
  report = {
    "reference": ctx.reference_name,
    "options": json.loads(json.dumps(dataclasses.asdict(ctx.options))),
    "species": state.species,
    "reference_calls": loop.labels_used(ctx),
    "labels": len(ctx.labels.read()),
    "failed_calls": len(ctx.labels.failures()),
    "minutes": round(ctx.minutes(), 2),
    "stop_reason": state.stop_reason,
    "isolated_atoms_eV": state.isolated_atoms,
    "rounds": state.rounds,
    "final": state.final,
  }
  (ctx.folder / REPORT).write_text(json.dumps(report, indent=1))
  plot(report, ctx.folder / PLOT)
  return report


def provenance(report: dict) -> dict:
  """What the model file records of how it was learnt."""
  keep = ("reference", "species", "reference_calls", "labels", "failed_calls", "minutes")
  out = {k: report[k] for k in keep}
  out.update(rounds=len(report["rounds"]), stop_reason=report["stop_reason"])
  last = [r for r in report["rounds"] if r.get("next_round")]
  if last:
    out["last_next_round"] = last[-1]["next_round"]
  if report["final"] and report["final"].get("test"):
    out["test"] = report["final"]["test"]
  return out


def plot(report: dict, path: Path) -> bool:
  """Force errors and uncertainty against reference calls; False without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  rounds = [r for r in report["rounds"] if "labels" in r]
  calls = [r["labels"] for r in rounds]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for kind in ("select", "check"):
    pts = [(r["labels"], r["next_round"][kind]["forces_mae_meV_A"]) for r in rounds
           if (r.get("next_round") or {}).get(kind)]  # fmt: skip
    if pts:
      ax1.plot(*zip(*pts), "o-", label=f"next round, {kind}ed frames")
  test = [(r["labels"], r["test"]["forces_mae_meV_A"]) for r in rounds if r.get("test")]
  if test:
    ax1.plot(*zip(*test), "s-", label="test file")
  ax1.set(xlabel="reference calls", ylabel="force MAE (meV/Å)")
  if ax1.lines:
    ax1.legend(fontsize=7)
  unc = [(r["labels"], r["top_uncertainty"]) for r in rounds if r.get("top_uncertainty")]
  if unc:
    ax2.semilogy(*zip(*unc), "o-")
  ax2.axhline(report["options"]["uncertainty_target"], color="k", ls="--", lw=0.8)
  ax2.set(xlabel="reference calls", ylabel="top-T max force uncertainty (eV/Å)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return bool(calls)
