"""The first labels: rattled copies of the start structures, and (when the reference is cheap)
frames of a short MD with the reference itself.

Copies displaced by a ladder of amplitudes (from a tenth of ``rattle`` up to it) give the
first model the curvature around the start and some of the repulsive wall; periodic cells are
also strained a little (up to 2 %) so the stress has something to fit. Reference MD frames
(every ``MD_INTERVAL`` steps, at each temperature of the ladder) put the first model where
the exploration starts: in the thermal region. Rattles alone left it there blind: on glycine
with GFN2-xTB its replicas ran away within 0.025 ps and every later round labelled runaways
(docs' benchmarks, active learning). MD costs ``MD_INTERVAL`` reference calls per frame, so it
is used only where those fit ``MD_FRACTION`` of the time limit (:func:`md_frames`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from ase import Atoms

from plugin.data import read_images
from plugin.md.ase_engine import run_ase

from .labels import LabelError, checked, failure_reason

_STRAIN = 0.02
MD_INTERVAL = 20  # reference MD steps between kept frames (closer ones are nearly copies)
MD_FRACTION = 0.05  # of the time limit, the most the seed MD may be expected to take
MD_SHARE = 2 / 3  # of the seed labels, from MD where it is affordable (the rest rattled)


def rattled(starts: Sequence[Atoms], count: int, rattle: float, seed: int) -> List[Atoms]:
  """``count`` copies of ``starts`` (taken in turn), displaced by Gaussian noise whose
  amplitude climbs from ``rattle / 10`` to ``rattle`` Å; periodic cells also strained."""
  rng = np.random.default_rng([seed, 17])
  amplitudes = np.geomspace(rattle / 10, rattle, count) if count > 1 else [rattle]
  out = []
  for i, amp in enumerate(amplitudes):
    a = starts[i % len(starts)].copy()
    a.calc = None
    if np.all(a.pbc):
      strain = np.eye(3) + rng.uniform(-_STRAIN, _STRAIN, (3, 3)) * (amp / rattle)
      a.set_cell(a.cell[:] @ (strain + strain.T) / 2, scale_atoms=True)
    a.positions = a.positions + rng.normal(0.0, amp, a.positions.shape)
    a.info = {"start": i % len(starts), "rattle": float(amp)}
    out.append(a)
  return out


def md_frames(call_seconds: float, seed_labels: int, time_limit_minutes: float) -> int:
  """Seed labels to take from reference MD: ``MD_SHARE`` of ``seed_labels`` if their
  ``MD_INTERVAL`` calls each, at ``call_seconds`` a call, fit ``MD_FRACTION`` of the time
  limit, else 0 (a DFT reference: rattles only)."""
  wanted = int(round(MD_SHARE * seed_labels))
  affordable = wanted * MD_INTERVAL * call_seconds <= MD_FRACTION * 60.0 * time_limit_minutes
  return wanted if affordable else 0


def md_plan(starts: Sequence[Atoms], temperatures: Sequence[float], count: int) -> List[tuple]:
  """``(start index, temperature, frames)`` runs sharing ``count`` frames: every start at
  every temperature (the first ``count`` of those pairs when there are more)."""
  runs = [(i, t) for i in range(len(starts)) for t in temperatures][:count]
  if not runs:
    return []
  share = np.full(len(runs), count // len(runs))
  share[: count % len(runs)] += 1
  return [(i, t, int(n)) for (i, t), n in zip(runs, share)]


def reference_md(
  start: Atoms, calc, *, temperature: float, frames: int, timestep: float, seed: int, traj: Path
) -> Tuple[List[Atoms], Optional[str]]:
  """``(frames, failure)``: up to ``frames`` frames (energy, forces, stress where periodic: the
  reference's) of NVT Langevin MD with ``calc`` from ``start``, one every ``MD_INTERVAL``
  steps after the start, written to ``traj`` as they come; a reference call that fails
  (``failure``: its reason, else None) or a runaway guard ends the run with the frames so far."""
  failure = None
  try:
    run_ase(
      start, calc, ensemble="nvt_langevin", timestep=timestep, steps=frames * MD_INTERVAL,
      temperature=temperature, interval=MD_INTERVAL, seed=seed, traj=str(traj),
    )  # fmt: skip
  except Exception as e:  # noqa: BLE001 - an SCF failure mid-MD costs that run, not the loop
    failure = failure_reason(e)
  return (read_images(traj)[1:] if traj.exists() else []), failure


def frame_label(atoms: Atoms) -> dict:
  """The reference's energy, forces (and stress, periodic) an MD frame carries, checked as
  :func:`plugin.learn.labels.label_one` checks a call's; LabelError otherwise."""
  from ase.calculators.calculator import PropertyNotImplementedError

  result = {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces()}
  if np.all(atoms.pbc):
    try:
      result["stress"] = atoms.get_stress(voigt=False)
    except PropertyNotImplementedError as e:
      raise LabelError("the reference gave no stress for a periodic cell") from e
  return checked(result)
