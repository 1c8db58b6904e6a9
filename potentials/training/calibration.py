"""An ensemble's spread against its errors on labelled frames: calibration (one scale per
quantity, fitted on validation frames and stored in the model file) and the measures of
``benchmarks/uncertainty.py`` (rank correlation, coverage). Definitions:
:mod:`potentials.ensemble`."""

from __future__ import annotations

from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import ensemble
from ..potential import Potential
from .batching import Frame, buckets, device_batch, make_batch
from .evaluation import batch_observables

_MEMBERS_CACHE: Dict[tuple, object] = {}


def _members_fn(potential: Potential):
  """Jitted ``(params, batch) -> (member energies (B, M), member forces (M, A, 3))``, one per
  architecture."""
  key = (potential.config, tuple(potential.species))
  if key not in _MEMBERS_CACHE:
    member_fn = potential.member_energies_fn(include_shift=True)
    if potential.config.force_heads:
      readout_fn = ensemble.readout_mean(potential.member_forces_fn(include_shift=True))

      def readout(params, bt):  # members' forces: the mean's plus their read-out deviations
        out = batch_observables(readout_fn, params, bt, strain=False, aux=True)
        member_e, deviations = out.aux
        frames = bt["cells"].shape[0]
        member_e = jax.ops.segment_sum(member_e, bt["atom_frame"], num_segments=frames)
        return member_e, out.forces[None] + jnp.swapaxes(deviations, 0, 1)

      _MEMBERS_CACHE[key] = jax.jit(readout)
      return _MEMBERS_CACHE[key]

    def members(params, bt):
      committee = potential.config.committee
      out = batch_observables(member_fn, params, bt, strain=False, members=committee)
      return out.member_energies, out.member_forces

    _MEMBERS_CACHE[key] = jax.jit(members)
  return _MEMBERS_CACHE[key]


def exact_member_forces(potential: Potential, bt: dict) -> jax.Array:
  """Every member's differentiated forces ``(M, A, 3)`` on a device batch (one backward pass
  per member; for a shallow ensemble without ``force_heads``, or a committee)."""
  if potential.config.force_heads:
    raise ValueError("exact member forces need the ensemble without its readout")
  return _members_fn(potential)(potential.params, bt)[1]


def spread_records(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> List[dict]:
  """Per labelled frame: ``energy_error`` and ``energy_sigma`` (eV), ``forces_error``
  ``(N, 3)`` and ``forces_sigma`` ``(N,)`` (eV/Å); sigmas uncalibrated (scale 1)."""
  fn = _members_fn(potential)
  out: List[dict] = [{} for _ in frames]
  for idx, (B, A, E) in buckets(frames, batch_size, 4096):
    b = make_batch([frames[i] for i in idx], potential, B, A, E)
    member_e, member_f = (
      np.asarray(x, np.float64) for x in fn(potential.params, device_batch(b, dtype))
    )
    for slot, i in enumerate(idx):
      atoms = np.flatnonzero(b.atom_frame == slot)
      s = ensemble.spread(member_e[slot], member_f[:, atoms])
      rec = {"energy_sigma": float(s.energy), "forces_sigma": np.asarray(s.forces, np.float64)}
      if b.has_energy[slot]:
        rec["energy_error"] = float(member_e[slot].mean() - b.energy[slot])
      if b.has_forces[atoms].all():
        rec["forces_error"] = member_f[:, atoms].mean(axis=0) - b.forces[atoms]
      out[i] = rec
  return out


def calibrate(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> Potential:
  """``potential`` with the scales that put 68.3 % of its errors within one sigma on
  ``frames`` (:func:`potentials.ensemble.calibration_scale`) stored in its metadata."""
  recs = spread_records(potential, frames, batch_size, dtype)
  e = [(r["energy_error"], r["energy_sigma"]) for r in recs if "energy_error" in r]
  f = [(r["forces_error"], r["forces_sigma"]) for r in recs if "forces_error" in r]
  energy_scale = ensemble.calibration_scale(*map(np.asarray, zip(*e))) if e else 1.0
  forces_scale = 1.0
  if f:
    err = np.concatenate([x for x, _ in f])
    sig = np.concatenate([np.repeat(s[:, None], 3, axis=1) for _, s in f])
    forces_scale = ensemble.calibration_scale(err, sig)
  meta = dict(potential.metadata)
  meta[ensemble.METADATA_KEY] = {
    "energy_scale": energy_scale,
    "forces_scale": forces_scale,
    "members": potential.num_members,
    "committee": potential.config.committee,
    "heads": potential.config.readout_heads,
    "calibration_frames": len(recs),
  }
  return potential.replace(metadata=meta)


def uncertainty_metrics(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> Dict[str, float]:
  """How well the calibrated spread predicts the error on ``frames``: Spearman rank
  correlation per frame between the mean predicted force uncertainty and the force RMSE
  (and the same for |energy error|), the fraction of force components within one predicted
  sigma (68 % when calibrated), and the mean force uncertainty and RMSE (eV/Å)."""
  e_scale, f_scale = potential.uncertainty_scales
  recs = [r for r in spread_records(potential, frames, batch_size, dtype) if "forces_error" in r]
  if not recs:
    return {}
  sig = np.array([f_scale * r["forces_sigma"].mean() for r in recs])
  rmse = np.array([np.sqrt(np.mean(r["forces_error"] ** 2)) for r in recs])
  within = np.concatenate(
    [np.abs(r["forces_error"]) <= f_scale * r["forces_sigma"][:, None] for r in recs]
  )
  out = {
    "frames": len(recs),
    "forces_spearman": spearman(sig, rmse),
    "forces_within_1sigma": float(within.mean()),
    "forces_sigma_mean": float(sig.mean()),
    "forces_rmse": float(np.sqrt(np.mean(rmse**2))),
  }
  if all("energy_error" in r for r in recs):
    e_sig = np.array([e_scale * r["energy_sigma"] for r in recs])
    e_err = np.abs([r["energy_error"] for r in recs])
    out["energy_spearman"] = spearman(e_sig, e_err)
    out["energy_within_1sigma"] = float(np.mean(e_err <= e_sig))
  return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (ties get their mean rank); NaN for fewer than 2 points."""
  if len(x) < 2:
    return float("nan")
  return float(np.corrcoef(_ranks(np.asarray(x)), _ranks(np.asarray(y)))[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
  order = np.argsort(v, kind="stable")
  ranks = np.empty(len(v))
  ranks[order] = np.arange(len(v))
  for value in np.unique(v[np.r_[np.diff(np.sort(v)) == 0, False]]):  # ties
    ranks[v == value] = ranks[v == value].mean()
  return ranks
