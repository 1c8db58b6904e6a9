"""Fit a shallow ensemble's force readout (``ModelConfig.force_heads``) to its members'
differentiated force deviations.

A member's force deviation from the mean, ``-d(E_m - E)/dR``, costs a backward pass per
member. The readout (:mod:`potentials.force_readout`) gives it from the forward pass; here it
learns to imitate the exact deviations on structures (no labels needed: the target is the
ensemble itself), with the network frozen. The exact ones are computed once per structure.
Trained on the training frames plus copies rattled further (``rattle``), the readout also
follows the members where the training data thins out, which is where their spread matters.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import ensemble
from ..ops import pair_vectors
from ..potential import Potential, init_params
from .batching import Frame, buckets, device_batch, make_batch
from .calibration import exact_member_forces
from .config import TrainConfig

MAX_STEPS = 20000  # optimiser steps at most, however small the data


def _uncalibrated(metadata, *drop) -> dict:
  """``metadata`` without the calibration and its measures (they belong to another way of
  getting the members' forces; calibrate again) and the keys ``drop``."""
  gone = {ensemble.METADATA_KEY, "test_uncertainty", *drop}
  return {k: v for k, v in metadata.items() if k not in gone}


def with_readout(potential: Potential, seed: int = 0) -> Potential:
  """``potential`` (a shallow ensemble) with ``force_heads`` and, if it had none, a freshly
  initialised readout (the network's parameters unchanged, the calibration dropped)."""
  if potential.config.force_heads:
    return potential
  config = dataclasses.replace(potential.config, force_heads=True)  # checks heads > 1
  fresh = init_params(config, len(potential.species), jax.random.PRNGKey(seed))
  params = {**potential.params, "force_readout": fresh["force_readout"]}
  return potential.replace(config=config, params=params, metadata=_uncalibrated(potential.metadata))


def without_readout(potential: Potential) -> Potential:
  """The same shallow ensemble with its members' forces differentiated (no readout; the
  calibration, which was the readout's, dropped: run ``calibrate`` again)."""
  if not potential.config.force_heads:
    return potential
  params = {k: v for k, v in potential.params.items() if k != "force_readout"}
  config = dataclasses.replace(potential.config, force_heads=False)
  meta = _uncalibrated(potential.metadata, "force_readout")
  return potential.replace(config=config, params=params, metadata=meta)


def rattled(frames: Sequence[Frame], sigma: float, seed: int = 0) -> List[Frame]:
  """Unlabelled copies of ``frames`` with Gaussian displacements (``sigma`` Å per
  component), keeping their pair lists: a pair that moves inside the cutoff is left out, in
  the exact deviations and the readout alike, so the two stay comparable."""
  rng = np.random.default_rng(seed)
  return [
    dataclasses.replace(
      f,
      positions=f.positions + rng.normal(0.0, sigma, f.positions.shape),
      energy=None,
      forces=None,
      stress=None,
    )
    for f in frames
  ]


def fit_force_readout(
  potential: Potential,
  frames: Sequence[Frame],
  *,
  minutes: float = TrainConfig.readout_minutes,
  rattle: float = TrainConfig.readout_rattle,
  batch_size: int = 16,
  learning_rate: float = 3e-3,
  seed: int = 0,
  dtype=jnp.float32,
  clock: Callable[[], float] = time.perf_counter,
) -> Potential:
  """``potential`` with ``force_heads`` whose readout imitates its members' differentiated
  force deviations on ``frames`` and, with ``rattle > 0``, on copies displaced by that much:
  mean squared deviation error, Adam with cosine decay fitted to ``minutes`` (at most
  ``MAX_STEPS`` steps; ``minutes`` counted on ``clock``, which tests replace). The fit's measures
  (``r2``: 1 - residual / target variance on every structure used) go to the metadata under
  ``"force_readout"``. The calibration of ``potential`` is dropped: run
  :func:`~potentials.training.calibrate` on validation frames afterwards."""
  if not frames:
    raise ValueError("fit_force_readout needs structures to imitate the members on")
  start = clock()
  pot = with_readout(potential, seed)
  exact = without_readout(pot)
  structures = list(frames) + (rattled(frames, rattle, seed) if rattle > 0 else [])
  batches = []
  for idx, (B, A, E) in buckets(structures, batch_size, 4096):
    bt = device_batch(make_batch([structures[i] for i in idx], pot, B, A, E), dtype)
    member_f = exact_member_forces(exact, bt)  # (M, A, 3), padded atoms 0
    target = jnp.swapaxes(member_f - jnp.mean(member_f, axis=0), 0, 1)
    batches.append((bt, target))
  deviations_fn = pot.member_forces_fn()
  # an argument of the jitted functions, not a constant compiled into them
  network = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in pot.params.items()}
  network.pop("force_readout")

  def residual(readout, network, bt, target):
    """``(A, M, 3)`` readout minus exact deviations, 0 on padded atoms."""
    d = deviations_fn(
      {**network, "force_readout": readout},
      species_index=bt["species"],
      r=pair_vectors(
        bt["positions"],
        bt["dst"],
        bt["src"],
        bt["shifts"],
        bt["cells"],
        pair_frame=bt["pair_frame"],
      ),
      dst=bt["dst"],
      src=bt["src"],
      atom_mask=bt["atom_mask"],
      indices_are_sorted=True,
    )[1]
    return jnp.where(bt["atom_mask"][:, None, None], d - target, 0.0)

  def loss(readout, network, bt, target):
    count = jnp.maximum(jnp.sum(bt["atom_mask"]) * target.shape[1] * 3, 1)
    return jnp.sum(residual(readout, network, bt, target) ** 2) / count

  adam = optax.scale_by_adam()

  @jax.jit
  def step(readout, network, state, bt, target, lr):
    grads = jax.grad(loss)(readout, network, bt, target)
    updates, state = adam.update(grads, state, readout)
    return jax.tree_util.tree_map(
      lambda p, u: p - (lr * u).astype(p.dtype), readout, updates
    ), state

  squared = jax.jit(lambda ro, net, bt, t: jnp.sum(residual(ro, net, bt, t) ** 2))
  readout = jax.tree_util.tree_map(jnp.asarray, pot.params["force_readout"])
  state = adam.init(readout)
  rng = np.random.default_rng(seed)
  epochs, total = 0, max(1, MAX_STEPS // len(batches))
  while epochs < total:
    lr = learning_rate * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * epochs / total)))
    t0 = clock()
    for i in rng.permutation(len(batches)):
      readout, state = step(readout, network, state, *batches[i], lr)
    jax.block_until_ready(readout)
    epochs += 1
    if epochs == 2:  # the first epoch compiled: fit the cosine schedule to the budget
      now = clock()
      total = int(np.clip(2 + (60 * minutes - (now - start)) / (now - t0), 2, total))
  res = sum(float(squared(readout, network, bt, t)) for bt, t in batches)
  tot = sum(float(jnp.sum(t**2)) for _, t in batches)
  params = {**pot.params, "force_readout": jax.tree_util.tree_map(np.asarray, readout)}
  meta = _uncalibrated(pot.metadata)
  meta["force_readout"] = {
    "r2": 1.0 - res / max(tot, 1e-30),
    "structures": len(structures),
    "rattle": rattle,
    "epochs": epochs,
    "seconds": clock() - start,
  }
  return pot.replace(params=params, metadata=meta)
