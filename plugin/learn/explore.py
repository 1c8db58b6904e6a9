"""One exploration round: batched MD replicas on the current model, every frame scored.

Replicas of every start structure at every temperature of the ladder run together in one
compiled program (:func:`plugin.md.run` on a list). A replica whose calibrated force
uncertainty passes ``STOP_FACTOR`` times the target, or that trips a runaway guard, leaves the
batch with its last good frame written: the frames before a runaway are where the model is
most wrong, so they are candidates like any other, not an error. A round's MD stops at its
deadline (``seconds``, checked at each chunk's end), so exploration never eats the time of
the round's labels and training.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import List, Sequence

import numpy as np
from ase import Atoms

import potentials
from plugin import md
from plugin.md import guards
from plugin.data import frame_from_atoms, read_images
from potentials import training

from .options import LearnOptions

STOP_FACTOR = 10.0  # a replica this far past the target is off the map: harvest and stop it
FRAMES_PER_REPLICA = 40  # frames written per replica and pass (the candidates)
MAX_PASSES = 4
_DEADLINE = guards.NAMES[guards.WALL_TIME]  # a replica's ``stopped`` at the round's deadline


@dataclasses.dataclass
class Exploration:
  """A round's candidates (frames without labels) and what the replicas did.

  Attributes:
    frames: candidate structures, each with ``info["temperature_K"]`` and ``info["replica"]``.
    scores: ``(len(frames),)`` largest calibrated per-atom force uncertainty (eV/Å).
    stopped: per replica, why it left the batch early (None: it ran to the end;
      ``"max_wall_time"``: the round's deadline).
    temperatures: per replica, its thermostat target (K).
    picoseconds: MD time run, summed over replicas.
  """

  frames: List[Atoms]
  scores: np.ndarray
  stopped: List[str | None]
  temperatures: List[float]
  picoseconds: float

  @property
  def cut(self) -> bool:
    """Whether the round's deadline stopped its MD."""
    return _DEADLINE in self.stopped

  @property
  def runaways(self) -> int:
    """Replicas that left the batch early (guard or uncertainty; not the deadline)."""
    return sum(s is not None and s != _DEADLINE for s in self.stopped)

  def top_max(self, top: float) -> float:
    """The largest score at the top temperature (inf if a replica there stopped early)."""
    hot = [i for i, t in enumerate(self.temperatures) if t == top]
    if any(self.stopped[i] for i in hot):
      return float("inf")
    mask = np.array([f.info["replica"] in hot for f in self.frames], bool)
    return float(self.scores[mask].max()) if mask.any() else float("inf")


def replica_plan(starts: Sequence[Atoms], options: LearnOptions):
  """``(systems, temperatures)``: every start at every temperature, ``replicas`` times."""
  systems, temps = [], []
  for start in starts:
    for t in options.temperatures:
      for _ in range(options.replicas):
        systems.append(start)
        temps.append(t)
  return systems, temps


def explore(
  potential: potentials.Potential,
  starts: Sequence[Atoms],
  options: LearnOptions,
  *,
  folder: Path,
  round_: int,
  wanted: int = 0,
  seconds: float = float("inf"),
) -> Exploration:
  """Run the round's replicas (trajectories in ``folder``) for at most ``seconds`` and score
  every written frame.

  Replicas that leave early write few frames: while fewer than ``wanted`` candidates are in
  hand and time is left, the batch runs again from the starts with new seeds (at most
  ``MAX_PASSES`` times; the compiled program is reused). The program is compiled by a
  one-chunk warm-up before the clock starts: the first round's compilation (~100 s for 8
  glycine replicas on 2 cores) would otherwise leave its MD one chunk."""
  systems, temps = replica_plan(starts, options)
  dt = options.timestep_for(np.concatenate([s.numbers for s in starts]))
  steps = max(1, int(round(options.explore_ps * 1000.0 / dt)))
  folder.mkdir(parents=True, exist_ok=True)
  for old in folder.glob(f"explore-{round_}-*"):  # a round cut by a kill: explored again
    old.unlink()
  warm = folder / f"explore-{round_}-warmup.extxyz"
  _run(potential, systems, temps, options, dt, steps, warm, options.seed, float("inf"), once=True)
  for path in folder.glob(f"{warm.stem}.*"):
    path.unlink()
  deadline = time.perf_counter() + seconds
  ex = Exploration([], np.zeros(0), [], [], 0.0)
  for p in range(MAX_PASSES):
    traj, seed = folder / f"explore-{round_}-{p}.extxyz", options.seed + 1000 * round_ + 100 * p
    left = deadline - time.perf_counter()
    if p > 0 and left <= 0:
      break
    results = _run(potential, systems, temps, options, dt, steps, traj, seed=seed, seconds=left)
    offset = len(ex.stopped)
    new = _frames(folder, f"explore-{round_}-{p}", len(systems), temps, offset)
    ex.frames += new
    ex.scores = np.concatenate([ex.scores, scores(potential, new)])
    ex.stopped += [r.stopped for r in results]
    ex.temperatures += list(temps)
    ex.picoseconds += sum(r.steps for r in results) * dt / 1000.0
    if len(ex.frames) >= wanted:
      break
  return ex


def _run(potential, systems, temps, options, dt, steps, traj, seed, seconds, once=False):
  """One pass of the batch (NVT Langevin), frames every ``steps / FRAMES_PER_REPLICA``, for
  at most ``seconds`` (at least one chunk; ``once``: one chunk only, the same program)."""
  interval = max(1, steps // FRAMES_PER_REPLICA)
  with warnings.catch_warnings():  # a replica that leaves the batch warns; it is expected here
    warnings.simplefilter("ignore", RuntimeWarning)
    return md.run(
      systems,
      potential,
      ensemble="nvt_langevin",
      temperature=temps,
      seed=seed,
      timestep=dt,
      total_steps=interval if once else steps,
      chunk=interval,
      traj=str(traj),
      traj_interval=interval,
      max_uncertainty=STOP_FACTOR * options.uncertainty_target,
      max_wall_time=max(seconds, 1e-3) if np.isfinite(seconds) else None,
    )


def _frames(folder: Path, stem: str, count: int, temps, offset: int) -> List[Atoms]:
  """Every replica's written frames (the first is the start: skipped), tagged with the
  replica's index in the round (``offset + i``)."""
  out = []
  for i in range(count):
    for a in read_images(folder / f"{stem}.{i}.extxyz")[1:]:
      a.calc = None  # the model's own values are no labels
      info = {"replica": offset + i, "temperature_K": float(temps[i])}
      a.info = {**info, "md_step": a.info.get("md_step")}
      out.append(a)
  return out


def scores(potential: potentials.Potential, frames: Sequence[Atoms]) -> np.ndarray:
  """Each frame's largest calibrated per-atom force uncertainty (eV/Å)."""
  if not frames:
    return np.zeros(0)
  batch = [frame_from_atoms(a, potential.cutoff) for a in frames]
  _, forces_scale = potential.uncertainty_scales
  recs = training.spread_records(potential, batch)
  return np.array([forces_scale * float(np.max(r["forces_sigma"])) for r in recs])
