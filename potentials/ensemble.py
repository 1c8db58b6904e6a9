"""Ensembles: a potential with several members, and the uncertainty read from their spread.

Two kinds live in one model file, and combine (``members = committee * heads``):

* a *committee* (``ModelConfig.committee = K``): K independently initialised and trained
  parameter sets of one architecture, stacked on a leading axis of every parameter
  (:func:`stack`, :func:`unstack`); about K times the cost of one model;
* a *shallow ensemble* (``ModelConfig.readout_heads = H``): H readout heads on one shared network,
  which cost almost nothing more in energies (forces of every member cost one backward pass
  each, unless ``ModelConfig.force_heads`` reads their deviations out directly:
  :mod:`potentials.force_readout`, :func:`readout_spread`).

The model's energy is the members' mean. Uncertainties (:func:`spread`) are standard
deviations over the members, times a calibration factor per quantity fitted on validation
frames so that 68.3 % of their errors fall within one sigma (:func:`calibration_scale`), stored
in the file's metadata under ``"uncertainty"``:

* ``energy``: ``s_E * std_m(E_m)`` (eV);
* ``forces``: per atom ``s_F * sqrt(mean over members and x, y, z of (F_m - F)^2)`` (eV/Å): the
  standard deviation of one force component of that atom, so a calibrated model has about
  68 % of the force components within one of it from the reference.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ONE_SIGMA = 0.6827  # fraction of a Gaussian within one standard deviation
METADATA_KEY = "uncertainty"  # model-file metadata: {"energy_scale", "forces_scale", ...}


class Spread(NamedTuple):
  """Uncertainty of one structure: ``energy`` scalar (eV), ``forces`` ``(N,)`` (eV/Å per
  component), ``member_energies`` ``(M,)`` (eV; as given to :func:`spread`)."""

  energy: Array
  forces: Array
  member_energies: Array


def spread(
  member_energies: Array,
  member_forces: Array,
  *,
  energy_scale: float = 1.0,
  forces_scale: float = 1.0,
) -> Spread:
  """Calibrated spread of ``member_energies (M,)`` and ``member_forces (M, N, 3)``; zero for
  identical members (the standard deviation divides by M, so one member gives zero)."""
  e_std = jnp.std(member_energies)
  dev = member_forces - jnp.mean(member_forces, axis=0)
  f_std = jnp.sqrt(jnp.mean(dev * dev, axis=(0, 2)))
  return Spread(energy_scale * e_std, forces_scale * f_std, member_energies)


def readout_spread(
  member_energies: Array, deviations: Array, *, energy_scale: float = 1.0, forces_scale: float = 1.0
) -> Spread:
  """:func:`spread` of a shallow ensemble whose members' force deviations ``(N, M, 3)`` from
  the mean force were read out (``ModelConfig.force_heads``) instead of differentiated."""
  return spread(
    member_energies,
    jnp.swapaxes(deviations, 0, 1),
    energy_scale=energy_scale,
    forces_scale=forces_scale,
  )


def readout_mean(member_forces_fn):
  """``f(params, ...) -> (mean per-atom energies (N,), (member energies (N, M), deviations
  (N, M, 3)))`` from ``Potential.member_forces_fn()``, for
  :func:`potentials.observables.compute` with ``aux=True``: the mean is differentiated, the
  members come from the same forward pass."""

  def f(*args, **kwargs):
    e, d = member_forces_fn(*args, **kwargs)
    return jnp.mean(e, axis=-1), (e, d)

  return f


def calibration_scale(errors: np.ndarray, sigmas: np.ndarray) -> float:
  """The factor ``s`` that puts 68.3 % of the ``errors`` (a Gaussian's one-sigma fraction)
  within ``s * sigma``: the 68.3 % quantile of ``|error| / sigma`` over the entries with
  ``sigma > 0``. A quantile, not the RMS of ``error / sigma``: force errors have heavy tails,
  and an RMS-consistent scale puts ~80 % of them within one sigma. 1.0 when no entry has a
  spread."""
  e = np.asarray(errors, np.float64).ravel()
  s = np.asarray(sigmas, np.float64).ravel()
  ok = s > 0
  if not ok.any():
    return 1.0
  return float(np.quantile(np.abs(e[ok]) / s[ok], ONE_SIGMA))


def scales(metadata: Mapping) -> tuple:
  """``(energy_scale, forces_scale)`` stored in a model's metadata (1.0 where absent)."""
  cal = dict(metadata.get(METADATA_KEY, {}) or {})
  return float(cal.get("energy_scale", 1.0)), float(cal.get("forces_scale", 1.0))


def stack(params_list: Sequence) -> dict:
  """Parameter sets of one architecture stacked on a new leading axis (a committee)."""
  return jax.tree_util.tree_map(lambda *p: np.stack([np.asarray(x) for x in p]), *params_list)


def unstack(params, committee: int) -> list:
  """The ``committee`` parameter sets of a stacked committee."""
  return [jax.tree_util.tree_map(lambda p, k=k: np.asarray(p)[k], params) for k in range(committee)]


def member_axis(e: Array, committee: int, heads: int) -> Array:
  """Per-atom member energies as ``(N, members)``, members ordered committee-major, from
  ``(K, N, H)`` (committee), ``(N, H)`` (heads) or ``(K, N)``."""
  if committee > 1 and heads > 1:
    return jnp.moveaxis(e, 0, 1).reshape(e.shape[1], committee * heads)
  if committee > 1:
    return e.T
  return e


def cotangents(member_shape: tuple, committee: int, dtype) -> Array:
  """The cotangents that give every member's gradient from one ``vjp`` of the members'
  energies ``member_shape = (..., M)``: one per member (``(M,) + member_shape``), or for a
  committee whose K networks each got their own copy of the positions, one per head, set on
  that head of every network (``(M / K,) + member_shape``): the copies keep them apart."""
  m = member_shape[-1]
  groups = m // committee
  seeds = (jnp.arange(m)[None, :] % groups == jnp.arange(groups)[:, None]).astype(dtype)
  return jnp.broadcast_to(
    seeds.reshape((groups,) + (1,) * (len(member_shape) - 1) + (m,)), (groups,) + member_shape
  )


def member_gradients(g: Array, committee: int) -> Array:
  """Gradients in the positions from ``vmap(vjp)(cotangents(...))`` as ``(M, N, 3)``,
  committee-major (a committee's come as ``(heads, K, N, 3)``)."""
  if committee == 1:
    return g
  return jnp.swapaxes(g, 0, 1).reshape((-1,) + g.shape[2:])


def member_vjp(totals: Callable, positions: Array, *others, committee: int, has_aux=False):
  """Every member's gradients from one forward pass of ``totals(replicate(positions,
  committee), *others) -> (..., M)`` member totals and one backward pass per head (``vmap``
  over :func:`cotangents`): ``(member totals, (positions' gradients (M, N, 3) committee-major,
  *each of others' per cotangent), aux)`` (``aux`` with ``has_aux``, else None). The one
  helper behind every member force (:func:`member_forces`, ``observables.compute``)."""
  out = jax.vjp(totals, replicate(positions, committee), *others, has_aux=has_aux)
  member_e, vjp, aux = out if has_aux else (*out, None)
  grads = jax.vmap(vjp)(cotangents(member_e.shape, committee, member_e.dtype))
  return member_e, (member_gradients(grads[0], committee), *grads[1:]), aux


def member_forces(totals: Callable, positions: Array, committee: int):
  """``(member_energies (M,), member_forces (M, N, 3))`` of ``totals`` (:func:`member_vjp`)."""
  member_e, (grads,), _ = member_vjp(totals, positions, committee=committee)
  return member_e, -grads


def replicate(positions: Array, committee: int) -> Array:
  """One copy of the positions per committee network (``(K, N, 3)``; as given for K = 1)."""
  return (
    positions if committee == 1 else jnp.broadcast_to(positions, (committee,) + positions.shape)
  )
