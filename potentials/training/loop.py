"""The training loop: fit a :class:`potentials.Potential` to energies, forces and stresses.

Energies are fitted per atom, forces per component and stresses per component, with weights
(:class:`~potentials.training.TrainConfig`). Checkpoints (:mod:`potentials.io`, no pickle) hold
parameters, optimiser state, epoch, best validation loss and history, so training resumes
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..io import load_checkpoint, save_checkpoint
from ..potential import Potential, init_params
from .calibration import calibrate, uncertainty_metrics
from .batching import Frame, batch_capacity, device_batch, make_batch
from .config import MAX_SELECTION_FRAMES, TrainConfig
from .readout_fit import fit_force_readout
from .evaluation import evaluate, fit_element_shifts, grouped_metrics, predict_fn, refit_shifts
from .splits import split_parts, split_summary


def loss_fn(potential: Potential, config: TrainConfig) -> Callable:
  """``loss(params, batch, energy_weight=config.energy_weight) -> (total, (e, f, s))``.

  A shallow ensemble (several readout heads) adds ``nll_weight`` times the Gaussian negative
  log-likelihood of the per-atom energy error under the heads' spread, with the mean held
  fixed in it: the spread learns to follow the error, the mean is fitted as usual. A force
  readout (``force_heads``) is not trained here but fitted afterwards
  (:func:`~potentials.training.readout_fit.fit_force_readout`)."""
  heads = potential.num_members > 1
  predict = predict_fn(potential, members=heads)
  if config.loss == "huber":
    d = config.huber_delta
    penalty = lambda x: jnp.where(jnp.abs(x) < d, x**2, 2 * d * jnp.abs(x) - d**2)
  else:
    penalty = jnp.square

  def loss(params, bt, energy_weight=config.energy_weight):
    e, f, s, *members = predict(params, bt)
    n = jnp.maximum(bt["num_atoms"], 1)
    de = jnp.where(bt["has_energy"], (e - bt["energy"]) / n, 0.0)
    df = jnp.where(bt["has_forces"][:, None], f - bt["forces"], 0.0)
    ds = jnp.where(bt["has_stress"][:, None, None], (s - bt["stress"]) * 100.0, 0.0)
    le = jnp.sum(penalty(de)) / jnp.maximum(jnp.sum(bt["has_energy"]), 1)
    lf = jnp.sum(penalty(df)) / jnp.maximum(3 * jnp.sum(bt["has_forces"]), 1)
    ls = jnp.sum(penalty(ds)) / jnp.maximum(9 * jnp.sum(bt["has_stress"]), 1)
    total = energy_weight * le + config.forces_weight * lf + config.stress_weight * ls
    if heads:
      total = total + config.nll_weight * _energy_nll(members[0], e, bt, n)
    return total, (e, f, s)

  return loss


# Per-atom energy spread below which the likelihood stops rewarding a narrower one (eV/atom)
_NLL_FLOOR = 1e-4
# Squared standardised errors beyond ~this grow only logarithmically in the likelihood: an
# error far outside a tiny spread (early training) would otherwise give gradients ~1e16 that
# overflow float32 in the gradient norm
_NLL_SOFT = 100.0


def _energy_nll(member_e, e, bt, n):
  """Mean Gaussian NLL (up to a constant) of the per-atom energy errors, with the members'
  standard deviation as sigma and the mean's error held fixed."""
  err = jax.lax.stop_gradient(e - bt["energy"]) / n
  var = jnp.var(member_e, axis=-1) / n**2 + _NLL_FLOOR**2
  z2 = _NLL_SOFT * jnp.log1p(err**2 / var / _NLL_SOFT)
  nll = 0.5 * (z2 + jnp.log(var / _NLL_FLOOR**2))
  return jnp.sum(jnp.where(bt["has_energy"], nll, 0.0)) / jnp.maximum(jnp.sum(bt["has_energy"]), 1)


@dataclasses.dataclass
class TrainResult:
  potential: Potential
  history: List[dict]
  metrics: Dict[str, Dict[str, float]]  # "train"/"valid"/"test"/"test_random" -> metrics
  seconds: float


def learning_rate(config: TrainConfig, step: int, total_steps: int, warmup_steps: int) -> float:
  """Linear warm-up to ``config.learning_rate``, then cosine decay to
  ``learning_rate * final_lr_fraction`` at ``total_steps``."""
  peak, low = config.learning_rate, config.learning_rate * config.final_lr_fraction
  if step < warmup_steps:
    return peak * (step + 1) / warmup_steps
  t = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
  return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


def _step_fn(potential: Potential, config: TrainConfig):
  """Jitted ``step(params, ema, opt_state, batch, lr, energy_weight, decay)``."""
  loss = loss_fn(potential, config)
  scale = optax.scale_by_amsgrad() if config.optimizer == "amsgrad" else optax.scale_by_adam()
  optimizer = optax.chain(optax.clip_by_global_norm(config.clip_norm), scale)

  @jax.jit
  def step(params, ema, opt_state, bt, lr, energy_weight, decay):
    (l, _), grads = jax.value_and_grad(loss, has_aux=True)(params, bt, energy_weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, ema, opt_state, l

  return step, optimizer, jax.jit(lambda p, bt: loss(p, bt)[0])


def _initial_params(potential: Potential, train_set: Sequence[Frame]) -> dict:
  """Least-squares element shifts and an energy scale from the force RMS."""
  params = jax.tree_util.tree_map(jnp.asarray, potential.params)
  shifts = fit_element_shifts(potential, train_set)
  f_all = np.concatenate(
    [f.forces.ravel() for f in train_set if f.forces is not None] or [np.ones(1)]
  )
  scale = max(float(np.sqrt(np.mean(f_all**2))), 1e-3)
  return {
    **params,
    "shift": jnp.asarray(shifts, jnp.float32),
    "scale": jnp.full(len(potential.species), scale, jnp.float32),
  }


def _initial_state(
  potential: Potential,
  train_set: Sequence[Frame],
  optimizer,
  checkpoint: Optional[str],
  fine_tune: bool,
) -> dict:
  """A fresh training state (from ``potential``'s own parameters when ``fine_tune``), or the
  one in ``checkpoint`` if that file exists."""
  if fine_tune:
    params = jax.tree_util.tree_map(jnp.asarray, potential.params)
  else:
    params = _initial_params(potential, train_set)
  state = {
    "params": params,
    "ema": params,
    "opt_state": optimizer.init(params),
    "epoch": 0,
    "step": 0,
    "elapsed": 0.0,
    "best_loss": np.inf,
    "best_params": params,
    "history": "[]",
  }
  if checkpoint and Path(checkpoint).exists():
    state = load_checkpoint(checkpoint, state)
  return state


def _batches_fn(potential: Potential, frames: Sequence[Frame], batch_size: int, dtype):
  """``batches(subset)``: device batches of ``subset`` with one capacity for all ``frames``
  (one compilation for the whole run)."""
  cap = batch_capacity(frames, batch_size)
  return lambda subset: (
    device_batch(make_batch(subset[i : i + batch_size], potential, batch_size, *cap), dtype)
    for i in range(0, len(subset), batch_size)
  )


def _planned_epochs(config: TrainConfig, done: int, elapsed: float, epoch_seconds: float) -> int:
  """Epochs that fit the time limit at the measured pace (at least the ones done)."""
  if config.time_limit is None:
    return config.epochs
  left = config.time_limit * 60 - elapsed
  return max(done, min(config.epochs, done + int(left // max(epoch_seconds, 1e-9))))


def train(
  potential: Potential,
  frames: Sequence[Frame],
  config: TrainConfig = TrainConfig(),
  *,
  checkpoint: Optional[str] = None,
  resume: bool = True,
  fine_tune: bool = False,
  progress: bool = True,
  dtype=jnp.float32,
  log: Optional[Callable[[dict], None]] = None,
) -> TrainResult:
  """Fit ``potential`` (its config and species fixed) to ``frames``.

  Per-element shifts are fitted by least squares before training and the energy scale is set
  from the force RMS; with ``fine_tune`` training starts from ``potential``'s parameters
  as they are (a trained model adapted to new data; its earlier training, provenance and
  test metrics are kept as ``metadata["fine_tuned_from"]``). The best (EMA) parameters on
  the validation set are kept; with ``checkpoint`` a checkpoint is written after every epoch
  and, with ``resume``, an existing one is continued (the time limit counts the time already
  spent). Returns the best potential, with its split and test metrics in ``metadata``.
  """
  start = time.perf_counter()
  frames = list(frames)
  parts = split_parts(frames, config)
  train_set, valid_set = ([frames[i] for i in parts[k]] for k in ("train", "valid"))
  step, optimizer, eval_loss = _step_fn(potential, config)
  state = _initial_state(potential, train_set, optimizer, checkpoint if resume else None, fine_tune)
  history = json.loads(str(state["history"]))
  batches = _batches_fn(potential, frames, config.batch_size, dtype)
  # model selection reads evenly spaced validation frames (neighbouring MD frames are
  # correlated, so a subsample loses little); the final metrics use all of them
  stride = max(1, math.ceil(len(valid_set) / MAX_SELECTION_FRAMES))
  valid_batches = list(batches(valid_set[::stride]))
  rng = np.random.default_rng(config.seed + 1)
  for _ in range(state["epoch"]):  # replay the shuffles of completed epochs when resuming
    rng.permutation(len(train_set))
  steps_per_epoch = max(1, math.ceil(len(train_set) / config.batch_size))
  warmup = max(1, min(config.warmup_epochs * steps_per_epoch, steps_per_epoch * config.epochs - 1))
  bar = None
  if progress:
    from tqdm.auto import tqdm  # only a display dependency

    bar = tqdm(total=config.epochs, initial=int(state["epoch"]), unit="epoch", dynamic_ncols=True)
  clock0, planned, epoch_s = time.perf_counter() - float(state["elapsed"]), config.epochs, None
  params, ema, opt_state, t = state["params"], state["ema"], state["opt_state"], int(state["step"])
  first_epoch = int(state["epoch"])
  for epoch in range(first_epoch, config.epochs):
    if epoch >= planned:
      break
    t_epoch = time.perf_counter()
    late = epoch >= (1 - config.late_fraction) * planned and config.late_energy_weight is not None
    e_weight = config.late_energy_weight if late else config.energy_weight
    losses = []
    for bt in batches([train_set[j] for j in rng.permutation(len(train_set))]):
      lr = learning_rate(config, t, planned * steps_per_epoch, warmup)
      decay = min(config.ema_decay, (1 + t) / (10 + t))
      params, ema, opt_state, l = step(params, ema, opt_state, bt, lr, e_weight, decay)
      losses.append(float(l))
      t += 1
      if len(losses) == 1:  # the first step of a process also compiles: pace from the rest
        t_first = time.perf_counter()
    v = (
      float(np.mean([float(eval_loss(ema, bt)) for bt in valid_batches]))
      if valid_batches
      else float(np.mean(losses))
    )
    if not np.isfinite(v):
      raise FloatingPointError(
        f"validation loss became {v} at epoch {epoch + 1}; lower the learning rate"
      )
    if v < state["best_loss"]:
      state["best_loss"], state["best_params"] = v, ema
    now = time.perf_counter()
    elapsed = now - clock0
    # pace of an epoch from this one's steps after the first (compiles), scaled to all steps
    epoch_s = (
      (now - t_first) * len(losses) / max(len(losses) - 1, 1) if len(losses) > 1 else now - t_epoch
    )
    planned = _planned_epochs(config, epoch + 1, elapsed, epoch_s)
    if epoch == first_epoch and config.time_limit and elapsed < config.time_limit * 60:
      planned = max(planned, min(epoch + 2, config.epochs))  # measure the pace once compiled
    record = {
      "epoch": epoch + 1,
      "train_loss": float(np.mean(losses)),
      "valid_loss": v,
      "lr": lr,
      "seconds": round(elapsed, 1),
    }
    history.append(record)
    state.update(
      params=params,
      ema=ema,
      opt_state=opt_state,
      epoch=epoch + 1,
      step=t,
      elapsed=elapsed,
      history=json.dumps(history),
    )
    if checkpoint:
      save_checkpoint(checkpoint, state)
    if log:
      log(record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['train_loss']:.4g}", valid=f"{v:.4g}")
      bar.update(1)
  if bar is not None:
    bar.close()
  if fine_tune:
    keep = ("training", "provenance", "test_metrics", "fine_tuned_from")  # a chain of fine-tunes
    earlier = {k: potential.metadata[k] for k in keep if k in potential.metadata}
    potential = potential.replace(metadata={**potential.metadata, "fine_tuned_from": earlier})
  return _finish(potential, frames, parts, state, config, dtype, history, start)


def train_committee(
  potential: Potential,
  frames: Sequence[Frame],
  config: TrainConfig = TrainConfig(),
  *,
  members: int,
  checkpoint: Optional[str] = None,
  **kwargs,
) -> TrainResult:
  """A committee of ``members`` models of ``potential``'s architecture, each trained by
  :func:`train` on the same split (member 0 from ``potential``'s parameters, member ``k``
  from a fresh initialisation with key ``fold_in(PRNGKey(config.seed), k)``), with
  ``config.time_limit`` shared equally; stacked (:meth:`Potential.stack`), evaluated and
  calibrated on the validation frames. ``checkpoint``: one file per member (``PATH.k``)."""
  if members < 2 or potential.config.committee != 1:
    raise ValueError(f"a committee needs members >= 2 single models, got members={members}")
  if potential.config.force_heads:
    raise ValueError(
      "a committee differentiates its members' forces and has no force readout: train it "
      "from a model without force_heads (potentials.training.without_readout)"
    )
  start = time.perf_counter()
  per_member = config
  if config.time_limit is not None:
    per_member = dataclasses.replace(config, time_limit=config.time_limit / members)
  trained = []
  for k in range(members):
    p = potential
    if k:
      key = jax.random.fold_in(jax.random.PRNGKey(config.seed), k)
      p = potential.replace(params=init_params(potential.config, len(potential.species), key))
    ckpt = f"{checkpoint}.{k}" if checkpoint else None
    trained.append(train(p, frames, per_member, checkpoint=ckpt, **kwargs))
  committee = Potential.stack([r.potential for r in trained])
  frames = list(frames)
  parts = split_parts(frames, config)
  dtype = kwargs.get("dtype", jnp.float32)
  sets = {k: [frames[i] for i in idx] for k, idx in parts.items()}
  meta = dict(trained[0].potential.metadata)
  meta["training"] = dict(
    meta["training"],
    committee=[r.potential.metadata["training"]["epochs_run"] for r in trained],
    seconds=time.perf_counter() - start,
    training_seconds=sum(r.potential.metadata["training"]["training_seconds"] for r in trained),
  )
  meta["member_test_metrics"] = [r.metrics["test"] for r in trained]
  committee, metrics = _evaluated(committee.replace(metadata=meta), sets, config, dtype)
  history = [dict(h, member=k) for k, r in enumerate(trained) for h in r.history]
  return TrainResult(committee, history, metrics, time.perf_counter() - start)


def _evaluated(potential: Potential, sets: dict, config: TrainConfig, dtype):
  """``(potential, metrics)``: metrics on every split part, the test ones (overall and by
  group) in the metadata; an ensemble also calibrated on the validation frames, with its
  uncertainty measures on the test frames (``test_uncertainty``)."""
  metrics = {k: evaluate(potential, v, config.batch_size, dtype) for k, v in sets.items()}
  meta = dict(
    potential.metadata,
    test_metrics=metrics["test"],
    test_random_metrics=metrics["test_random"],
    test_metrics_by_group=grouped_metrics(potential, sets["test"], config.batch_size, dtype),
  )
  potential = potential.replace(metadata=meta)
  if potential.num_members > 1:
    potential = calibrate(potential, sets["valid"] or sets["train"], config.batch_size, dtype)
    measures = uncertainty_metrics(potential, sets["test"], config.batch_size, dtype)
    potential = potential.replace(metadata={**potential.metadata, "test_uncertainty": measures})
  return potential, metrics


def _finish(potential, frames, parts, state, config, dtype, history, start) -> TrainResult:
  """The best parameters with refitted shifts, evaluated on every split part."""
  sets = {k: [frames[i] for i in idx] for k, idx in parts.items()}
  best = potential.replace(params=jax.tree_util.tree_map(np.asarray, state["best_params"]))
  best = refit_shifts(best, sets["train"], config.batch_size, dtype)
  if best.config.force_heads:
    best = fit_force_readout(
      best,
      sets["train"],
      minutes=config.readout_minutes,
      rattle=config.readout_rattle,
      seed=config.seed,
      dtype=dtype,
    )
  seconds = time.perf_counter() - start
  meta = dict(best.metadata)
  meta.update(
    {
      "training": {
        "config": dataclasses.asdict(config),
        "frames": len(frames),
        "split": [len(parts[k]) for k in ("train", "valid", "test")],
        "split_parts": {k: split_summary(frames, idx) for k, idx in parts.items()},
        "epochs_run": int(state["epoch"]),
        "seconds": seconds,
        "training_seconds": float(state["elapsed"]),
        "best_valid_loss": float(state["best_loss"]),
      },
    }
  )
  best, metrics = _evaluated(best.replace(metadata=meta), sets, config, dtype)
  return TrainResult(best, history, metrics, seconds)
