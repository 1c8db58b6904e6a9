"""The active-learning loop: seed labels -> train -> (explore -> select -> label -> fine-tune)*
-> a last training on all labels.

Every round is checked honestly before the model sees it: its new labels are predicted by the
model that chose them (``next_round``: the selected frames, a worst case, and frames drawn
uniformly from the same MD, the typical case), then the round joins the training data. A
user's ``test`` file is evaluated after every training.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from ase import Atoms

import potentials
from plugin.data import frame_from_atoms
from potentials import training

from . import explore as explore_lib
from . import seed as seed_lib
from .labels import LabelError, LabelFile, LabelPool, failure_reason, isolated_atom_energies
from .options import LearnOptions
from .select import fingerprint, select
from .state import LearnState

LABELS, MODEL, PENDING, CHECKPOINT = "labels.extxyz", "model.eqm", "pending.extxyz", "train.ckpt"
MIN_TRAIN_MINUTES = 0.25  # below this a training cannot compile and take a step or two
REPORT_MINUTES = 0.5  # kept back at the end for the report and plots
# a round's MD may use this share of the round's minutes, the rest being for its labels and
# training (unbounded, glycine's first round explored for 12 of its 2-minute share), but no
# less than MIN_EXPLORE_MINUTES, below which its program hardly compiles and runs a chunk
EXPLORE_FRACTION, MIN_EXPLORE_MINUTES = 1 / 3, 0.5


@dataclasses.dataclass
class Context:
  """What every step of a run reads (the state is what it changes)."""

  options: LearnOptions
  folder: Path
  starts: List[Atoms]
  pool: LabelPool
  labels: LabelFile
  reference_name: str
  test: Optional[list]
  log: Callable[[str], None]
  started: float  # time.perf_counter() at this process's start
  elapsed_before: float  # seconds used by earlier processes of the run

  def minutes(self) -> float:
    """Minutes of the run's time limit used so far (all processes)."""
    return (self.elapsed_before + time.perf_counter() - self.started) / 60.0

  def minutes_left(self) -> float:
    return self.options.time_limit - self.minutes()


def labels_used(ctx: Context) -> int:
  """Reference calls made: labelled frames and failed calls."""
  return len(ctx.labels.read()) + len(ctx.labels.failures())


def save(ctx: Context, state: LearnState) -> None:
  state.elapsed_s = ctx.minutes() * 60.0
  state.save(ctx.folder)


def write_pending(ctx: Context, state: LearnState, frames: Sequence[Atoms], round_: int):
  """Queue ``frames`` (info ``source``) for labels in ``pending.extxyz``: a kill during
  labelling resumes with the frames not yet labelled (:func:`label_pending`)."""
  import ase.io

  for i, a in enumerate(frames):
    a.info["pending"] = i
  tmp = ctx.folder / (PENDING + ".tmp")
  ase.io.write(tmp, list(frames), format="extxyz")
  tmp.replace(ctx.folder / PENDING)
  state.pending = {"round": round_}
  save(ctx, state)


def label_pending(ctx: Context, state: LearnState) -> dict:
  """Label what ``pending.extxyz`` holds and no label or failure of its round records."""
  import ase.io

  round_ = state.pending["round"]
  frames = ase.io.read(ctx.folder / PENDING, ":")
  done = {str(a.info.get("source")) for a in ctx.labels.read() if a.info.get("round") == round_}
  done |= {str(f.get("source")) for f in ctx.labels.failures() if f.get("round") == round_}
  todo = [a for a in frames if _source(a.info) not in done]
  stress = all(np.all(a.pbc) for a in todo)
  counts = {"labelled": 0, "failed": 0}
  for k, result, reason in ctx.pool.label(todo, stress=stress):
    a = todo[k]
    tag = dict(reference=ctx.reference_name, round=round_, source=_source(a.info))
    if result is None:
      ctx.labels.fail(a, reason, **tag)
      counts["failed"] += 1
    else:
      ctx.labels.append(a, result, **tag)
      counts["labelled"] += 1
  state.pending = None
  save(ctx, state)
  return counts


def _source(info: dict) -> str:
  """``kind:index`` (kind: seed, select, check): the frame's place in its round's list."""
  return f"{info['source']}:{info['pending']}"


def frames_of(ctx: Context, potential: potentials.Potential, where=lambda info: True):
  """The labelled frames (as training frames) whose ``info`` passes ``where``."""
  return [frame_from_atoms(a, potential.cutoff) for a in ctx.labels.read() if where(a.info)]


def train(ctx: Context, state: LearnState, potential, minutes: float, round_: int):
  """Train ``potential`` on every label for ``minutes`` (a fresh model in round 0, warm
  started after); a training cut by a kill resumes from its checkpoint."""
  o = ctx.options
  if state.training is None:
    config = {
      "split": "random",  # the honest figures are next_round's: here only model selection
      "valid_fraction": 0.1,
      "test_fraction": 0.0,
      "readout_minutes": max(0.05, 0.1 * minutes),
      **o.train,
      "time_limit": minutes,
      "seed": o.seed + round_,
    }
    state.training = {"round": round_, "config": config}
    save(ctx, state)
  config = training.TrainConfig(**state.training["config"])
  frames = frames_of(ctx, potential)
  result = training.train(
    potential.replace(metadata={}),
    frames,
    config,
    checkpoint=str(ctx.folder / CHECKPOINT),
    fine_tune=state.training["round"] > 0,
    progress=False,
  )
  for path in ctx.folder.glob(f"{CHECKPOINT}*"):
    path.unlink(missing_ok=True)
  result.potential.save(ctx.folder / MODEL)
  state.training = None
  save(ctx, state)
  return result


def errors(potential, frames) -> dict:
  """Force MAE (meV/Å) and energy MAE (meV/atom) of ``potential`` on labelled ``frames``."""
  if not frames:
    return {}
  m = training.error_metrics(potential, frames)
  out = {"frames": len(frames), "forces_mae_meV_A": 1e3 * m["forces_mae"]}
  if "energy_per_atom_mae" in m:
    out["energy_mae_meV_atom"] = 1e3 * m["energy_per_atom_mae"]
  return out


def seed_round(ctx: Context, state: LearnState) -> None:
  """Round 0: rattled copies of the starts, queued for labels, and where the reference is
  cheap enough (:func:`plugin.learn.seed.md_frames`) frames of MD with it (:func:`seed_md`);
  finish_round labels the rest and trains on them."""
  o = ctx.options
  state.current = {"round": 0, "started_minutes": round(ctx.minutes(), 2)}
  count = _seed_md_count(ctx, state)
  timed = 1 if "reference_call_seconds" in state.current else 0  # the start, labelled
  frames = seed_lib.rattled(ctx.starts, max(0, o.seed_labels - timed - count), o.rattle, o.seed)
  for a in frames:
    a.info["source"] = "seed"
  write_pending(ctx, state, frames, 0)
  seed_md(ctx, state)


def _seed_md_count(ctx: Context, state: LearnState) -> int:
  """Seed labels to take from reference MD (``LearnOptions.seed_md``; None: by the time of
  one reference call on the first start, made through the pool and kept as a label), also
  recorded in ``state.current["seed_md_frames"]``."""
  o = ctx.options
  count = 0
  if o.seed_md is True:
    count = seed_lib.md_frames(0.0, o.seed_labels, o.time_limit)
  elif o.seed_md is None and o.seed_labels >= 2 and not _start_tried(ctx):
    start = ctx.starts[0]
    t0 = time.perf_counter()
    ((_, result, reason),) = list(ctx.pool.label([start], stress=bool(np.all(start.pbc))))
    seconds = time.perf_counter() - t0
    tag = dict(reference=ctx.reference_name, round=0, source="start:0")
    if result is None:
      ctx.labels.fail(start, reason, **tag)
    else:
      ctx.labels.append(start, result, **tag)
      state.current["reference_call_seconds"] = round(seconds, 4)
      count = seed_lib.md_frames(seconds, o.seed_labels - 1, o.time_limit)
  state.current["seed_md_frames"] = count
  return count


def _start_tried(ctx: Context) -> bool:
  """Whether a seed round cut by a kill before its state was saved called the reference on
  the start already (it is not called twice; that round seeds without MD)."""
  tried = [a.info for a in ctx.labels.read()] + ctx.labels.failures()
  return any(i.get("round") == 0 and i.get("source") == "start:0" for i in tried)


def seed_md(ctx: Context, state: LearnState) -> None:
  """The seed MD runs with the reference (in this process) that are not done yet: every start
  at every temperature of the ladder; each run's frames are labelled when it ends (a run cut
  by a kill is run again on resume: the rule only allows MD for a cheap reference)."""
  o, record = ctx.options, state.current
  plan = seed_lib.md_plan(ctx.starts, o.temperatures, record.get("seed_md_frames", 0))
  done = record.get("seed_md_runs", 0)
  if done >= len(plan):
    return
  folder = ctx.folder / "seed-md"
  folder.mkdir(exist_ok=True)
  k = sum(n for _, _, n in plan[:done])  # label indices stay those of a run without a kill
  for run in range(done, len(plan)):
    i, t, n = plan[run]
    start = ctx.starts[i]
    frames, failure = seed_lib.reference_md(
      start, ctx.pool.calc, temperature=t, frames=n, timestep=o.timestep_for(start.numbers),
      seed=o.seed + run, traj=folder / f"md-{run}.extxyz",
    )  # fmt: skip
    if failure:
      ctx.log(f"seed MD at {t:g} K ended after {len(frames)} of {n} frames: {failure}")
    for j, a in enumerate(frames):
      tag = dict(reference=ctx.reference_name, round=0, source=f"md:{k + j}")
      try:
        ctx.labels.append(a, seed_lib.frame_label(a), **tag)
      except LabelError as e:
        ctx.labels.fail(a, failure_reason(e), **tag)
    k += n
    record["seed_md_runs"] = run + 1
    save(ctx, state)


def fresh_model(ctx: Context, state: LearnState) -> potentials.Potential:
  """The untrained shallow ensemble (force uncertainty read out) for the starts' species."""
  o = ctx.options
  species = [potentials.elements.symbol(z) for z in state.species]
  return potentials.Potential.create(
    o.seed, species=species, readout_heads=o.readout_heads, force_heads=True, **o.model
  )


def finish_round(ctx: Context, state: LearnState, potential) -> potentials.Potential:
  """Label the round's pending frames, check the model that chose them on them, train on
  every label and close the round's record; resumable at each step."""
  record, r = state.current, state.current["round"]
  if r == 0:  # seed MD runs a kill cut short
    seed_md(ctx, state)
  if state.pending is not None:
    record.update(label_pending(ctx, state))
  if r > 0 and "next_round" not in record:
    new = lambda kind: frames_of(ctx, potential, lambda i: _is(i, r, kind))  # noqa: E731
    record["next_round"] = {k: errors(potential, new(k)) for k in ("select", "check")}
    save(ctx, state)
  if state.training is None:
    spent = ctx.minutes() - record.get("started_minutes", ctx.minutes())
    record["train_budget"] = max(MIN_TRAIN_MINUTES, share_minutes(ctx, state) - spent)
  t0 = ctx.minutes()
  result = train(ctx, state, potential if r > 0 else fresh_model(ctx, state),
                 record["train_budget"], r)  # fmt: skip
  record["train_minutes"] = round(ctx.minutes() - t0, 2)
  record["test"] = errors(result.potential, ctx.test)
  record.update(labels=labels_used(ctx), minutes=round(ctx.minutes(), 2))
  state.rounds.append(record)
  state.current = None
  save(ctx, state)
  ctx.log(_line(record))
  return result.potential


def shares_left(ctx: Context, state: LearnState) -> int:
  """Shares of the exploration time and labels still to hand out: one per planned round left,
  two for round 0 (a model from scratch needs more than a warm-started fine-tune); fewer once
  a round's fixed costs are known, so that each round's training gets at least as long as
  its fixed costs (:func:`affordable_rounds`)."""
  done = len(state.rounds) + (1 if state.rounds else 0)  # round 0 took two
  planned = max(1, ctx.options.planned_rounds + 2 - done)
  affordable = affordable_rounds(ctx, state)
  return planned if affordable is None else max(1, min(planned, affordable))


def round_fixed_minutes(state: LearnState) -> Optional[float]:
  """Minutes the last exploration round spent outside its training (MD, scoring, labels,
  next-round and test errors; a resumed round also counts its restart, so it errs towards
  fewer rounds; None before one has finished). On glycine with GFN2-xTB at a 15-minute
  limit these were 1.5-2.3 minutes of 2.1-minute shares, leaving the rounds' trainings
  0.3 minutes each (docs' benchmarks, active learning)."""
  done = [r for r in state.rounds if r.get("round", 0) > 0 and "train_minutes" in r]
  if not done:
    return None
  r = done[-1]
  return max(0.0, r["minutes"] - r["started_minutes"] - r["train_minutes"])


def affordable_rounds(ctx: Context, state: LearnState) -> Optional[int]:
  """Rounds that fit the exploration time left if each trains at least as long as its fixed
  costs (None: those are not measured yet). A round whose model hardly trains explores with
  nearly the model before it: the time is better spent in the final training."""
  fixed = round_fixed_minutes(state)
  if fixed is None:
    return None
  return int(exploration_minutes_left(ctx) // (2 * max(fixed, MIN_TRAIN_MINUTES)))


def exploration_minutes_left(ctx: Context) -> float:
  """Minutes of the time limit left for rounds (the final training keeps its fraction)."""
  o = ctx.options
  return o.time_limit * (1 - o.final_fraction) - ctx.minutes()


def share_minutes(ctx: Context, state: LearnState) -> float:
  """The current round's minutes (explore, label, train) of the exploration time left."""
  weight = 2 if not state.rounds else 1
  return weight * exploration_minutes_left(ctx) / shares_left(ctx, state)


def labels_wanted(ctx: Context, state: LearnState) -> int:
  """Frames to select this round: an equal share of the labels left (at most per_round)."""
  o = ctx.options
  left = o.max_labels - labels_used(ctx)
  share = math.ceil(left / shares_left(ctx, state)) - o.check_per_round
  return max(1, min(o.per_round, share, left))


def explore_round(ctx: Context, state: LearnState, potential) -> Optional[str]:
  """Explore, pick and queue a round's frames (finish_round labels and trains); returns why
  exploration ends (None: go on)."""
  o, r = ctx.options, len(state.rounds)
  used = labels_used(ctx)
  if used >= o.max_labels:
    return "labels"
  if exploration_minutes_left(ctx) < 2 * MIN_TRAIN_MINUTES:
    return "time"
  if affordable_rounds(ctx, state) == 0:  # no round left whose training would pay
    return "time"
  record = {"round": r, "started_minutes": round(ctx.minutes(), 2)}
  wanted = labels_wanted(ctx, state)
  folder = ctx.folder / "explore"
  seconds = 60.0 * max(MIN_EXPLORE_MINUTES, EXPLORE_FRACTION * share_minutes(ctx, state))
  ex = explore_lib.explore(
    potential, ctx.starts, o, folder=folder, round_=r, wanted=3 * wanted, seconds=seconds
  )
  top = ex.top_max(o.top_temperature)
  # JSON has no infinity: None when a top-temperature replica left the batch
  record.update(explore_ps=round(ex.picoseconds, 3), top_uncertainty=_finite_or_none(top))
  record.update(stopped_replicas=ex.runaways, explore_cut=ex.cut, candidates=len(ex.frames))
  if top < o.uncertainty_target:
    record.update(labels=used, minutes=round(ctx.minutes(), 2))
    state.rounds.append(record)
    save(ctx, state)
    ctx.log(_line(record))
    return "converged"
  state.current = record
  write_pending(ctx, state, pick(ctx, potential, ex, wanted), r)
  return None


def _finite_or_none(x: float):
  return float(x) if np.isfinite(x) else None


def _is(info: dict, round_: int, kind: str) -> bool:
  return info.get("round") == round_ and str(info.get("source", "")).startswith(kind + ":")


def pick(ctx: Context, potential, ex, count: int) -> List[Atoms]:
  """The round's frames to label: ``count`` by uncertainty and diversity (fewer when few
  are uncertain), plus ``check_per_round`` drawn uniformly from the rest."""
  o = ctx.options
  species = sorted(set(int(z) for a in ctx.starts for z in a.numbers))
  fps = np.array([fingerprint(a, species, potential.cutoff) for a in ex.frames])
  labelled = ctx.labels.read()  # once: the file grows to hundreds of frames
  done = np.array([fingerprint(a, species, potential.cutoff) for a in labelled])
  chosen = select(ex.scores, fps, count, labelled=done, threshold=o.uncertainty_target)
  rest = np.setdiff1d(np.arange(len(ex.frames)), chosen)
  used = len(labelled) + len(ctx.labels.failures())  # labels_used, without a second read
  room = max(0, o.max_labels - used - len(chosen))
  rng = np.random.default_rng([o.seed, len(labelled)])
  checks = rng.permutation(rest)[: min(o.check_per_round, room)]
  out = []
  for kind, idx in (("select", chosen), ("check", checks)):
    for i in idx:
      a = ex.frames[int(i)].copy()
      a.info = {"source": kind}
      out.append(a)
  return out


def final_training(ctx: Context, state: LearnState, potential) -> potentials.Potential:
  """The rest of the time (less the report's) on all labels, warm started."""
  minutes = ctx.minutes_left() - REPORT_MINUTES
  if minutes < MIN_TRAIN_MINUTES and state.training is None:
    state.final = {"skipped": f"{minutes:.2f} minutes left"}
    save(ctx, state)
    return potential
  t0 = ctx.minutes()
  result = train(ctx, state, potential, max(minutes, MIN_TRAIN_MINUTES), len(state.rounds))
  state.final = {
    "train_minutes": round(ctx.minutes() - t0, 2),
    "labels": labels_used(ctx),
    "test": errors(result.potential, ctx.test),
  }
  save(ctx, state)
  f = state.final
  ctx.log(f"final training: {f['train_minutes']:.1f} min on {f['labels']} labels")
  return result.potential


def _line(record: dict) -> str:
  """One progress line per round."""
  parts = [f"round {record['round']}: {record.get('labels', 0)} labels"]
  if "top_uncertainty" in record:
    u = record["top_uncertainty"]
    parts.append("a top-T replica left" if u is None else f"top-T uncertainty {u:.3g} eV/Å")
  for kind, m in (record.get("next_round") or {}).items():
    if m:
      parts.append(f"next-round {kind} F MAE {m['forces_mae_meV_A']:.1f} meV/Å")
  if record.get("test"):
    parts.append(f"test F MAE {record['test']['forces_mae_meV_A']:.1f} meV/Å")
  parts.append(f"{record.get('minutes', 0):.1f} min")
  return ", ".join(parts)


def isolated_atoms(ctx: Context, state: LearnState) -> None:
  """Each element's lone-atom energy from the reference, once per run (in the report and
  the model's provenance)."""
  if not state.isolated_atoms:
    energies = isolated_atom_energies(ctx.pool, state.species)
    state.isolated_atoms = {str(z): e for z, e in energies.items()}
    save(ctx, state)
