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
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..io import load_checkpoint, save_checkpoint
from ..potential import Potential, init_params
from .calibration import calibrate, uncertainty_metrics
from .batching import Frame, batch_capacity, device_batch, kvector_capacity, make_batch
from .config import MAX_SELECTION_FRAMES, TrainConfig
from .readout_fit import fit_force_readout
from .schedule import Schedule, budget_of
from .evaluation import error_metrics, evaluation_shapes, fit_element_shifts, frame_groups
from .evaluation import grouped_metrics, predict_fn, refit_shifts
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
    "elapsed": 0.0,  # seconds of the budget used at the last checkpoint
    "warm_progress": -1.0,  # progress at the end of warm-up (-1: not yet)
    "optimisation_seconds": 0.0,  # of which in optimisation steps (not validation, saving)
    "lr_scale": 1.0,  # halved after each diverged epoch
    "lowest_loss": np.inf,  # the lowest mean training loss of an epoch
    "best_loss": np.inf,
    "best_params": params,
    "history": "[]",
  }
  if checkpoint and Path(checkpoint).exists():
    state = load_checkpoint(checkpoint, state)
  return state


def with_batch_size(config: TrainConfig, train_set: Sequence[Frame]) -> TrainConfig:
  """``config`` with its batch size resolved (:meth:`TrainConfig.frames_per_batch`) for
  these training frames: what is stored in the model file is the number used."""
  size = config.frames_per_batch([len(f.dst) for f in train_set])
  return dataclasses.replace(config, batch_size=size)


def _batches_fn(potential: Potential, frames: Sequence[Frame], batch_size: int, dtype):
  """``batches(subset)``: device batches of ``subset`` with one capacity for all ``frames``
  (one compilation for the whole run)."""
  cap = batch_capacity(frames, batch_size)
  k = kvector_capacity(frames, potential)
  pack = lambda part: make_batch(part, potential, batch_size, *cap, kvectors=k)  # noqa: E731
  return lambda subset: (
    device_batch(pack(subset[i : i + batch_size]), dtype) for i in range(0, len(subset), batch_size)
  )


# an epoch whose mean training loss is this many times the lowest so far has diverged (epoch
# means move by less than 2x in training that goes well; on DMSO a 50x epoch came before NaN):
# the weights of the epoch with the lowest loss come back and the learning rate is halved for
# the rest of the run (at most MAX_HALVINGS times). Not the epoch just before: on DMSO that one
# was often already climbing (5x) and diverged again at every lower rate (1e-2 -> 6e-4, 46
# meV/Å held out in 15 minutes)
DIVERGED = 10.0
MAX_HALVINGS = 6

# validation runs when the time since the last one is at least this many times its cost
# (at most ~5 % of the time goes to it; the last epoch is always validated)
VALID_EVERY = 19.0


@dataclasses.dataclass
class _Validation:
  """Validation of the EMA weights on the selection frames, run when due; measures its own
  cost (per frame, and compilation) for the budget's reserve."""

  eval_loss: Callable
  batches: list
  frames: int
  seconds: float = 0.0  # one pass, compiled
  compile_seconds: float = 0.0
  last: float = -math.inf  # clock reading at the end of the last pass

  def due(self, now: float) -> bool:
    return now - self.last >= VALID_EVERY * self.seconds

  def __call__(self, ema, clock) -> float:
    one_pass = lambda: float(np.mean([float(self.eval_loss(ema, bt)) for bt in self.batches]))
    t0 = clock()
    v = one_pass()
    t1 = clock()
    if self.last == -math.inf:  # first pass of this process: again, to split off compilation
      one_pass()
      t2 = clock()
      self.seconds, self.compile_seconds = t2 - t1, max(0.0, (t1 - t0) - (t2 - t1))
      t1 = t2
    self.last = t1
    return v


def _finish_seconds(
  potential: Potential, config: TrainConfig, sizes: dict, check, shapes: int
) -> float:
  """Estimated seconds of what follows training (:func:`_finish`): shifts refitted on the
  training frames, every split part evaluated (the test part twice), an ensemble's member
  forces on validation and test frames for calibration, a force readout's fit, at the
  measured cost per validation frame, with a compilation per batch shape (``shapes``,
  :func:`~potentials.training.evaluation.evaluation_shapes`)."""
  passes = sum(sizes.values()) + sizes["train"] + sizes["test"]
  # a margin of two compilations (on a Ni-Al alloy, 8-minute budget, one shape: 2 estimated
  # 48 s for the 58 s that finishing took). Molecules of varied sizes need more shapes: on
  # GFN2-xTB dimers of 3 to 12 atoms, 10 minutes, 3 compilations reserved 47-62 s for
  # finishing that took 176-227 s
  compiles = shapes + 2
  if potential.num_members > 1:
    passes += (sizes["valid"] + sizes["test"]) * potential.num_members
    compiles += 2  # the members' predictions
  per_frame = check.seconds / max(check.frames, 1)
  readout = 60.0 * config.readout_minutes if potential.config.force_heads else 0.0
  return 1.25 * per_frame * passes + compiles * check.compile_seconds + readout


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
  clock: Callable[[], float] = time.perf_counter,
  started: Optional[float] = None,
) -> TrainResult:
  """Fit ``potential`` (its config and species fixed) to ``frames``.

  Per-element shifts are fitted by least squares before training and the energy scale is set
  from the force RMS; with ``fine_tune`` training starts from ``potential``'s parameters
  as they are (a trained model adapted to new data; its earlier training, provenance and
  test metrics are kept as ``metadata["fine_tuned_from"]``). The run is bounded by
  ``config``'s budget (:attr:`TrainConfig.budget_minutes`, counted on ``clock`` from
  ``started``, default now: a command passes the moment it began) and ``epochs``; the
  learning rate follows the fraction used (:mod:`~potentials.training.schedule`). The best
  (EMA) parameters on the validation set are kept; with ``checkpoint`` a checkpoint is
  written after every epoch and, with ``resume``, an existing one is continued with the time
  its earlier processes left. Returns the best potential, with its split and test metrics in
  ``metadata``.
  """
  started = clock() if started is None else started
  frames = list(frames)
  parts = split_parts(frames, config)
  sizes = {k: len(v) for k, v in parts.items()}
  sets = {k: [frames[i] for i in v] for k, v in parts.items()}
  train_set, valid_set = sets["train"], sets["valid"]
  config = with_batch_size(config, train_set)
  # the programs finishing compiles: one per batch shape of the parts and the test groups
  shapes = evaluation_shapes(
    [*sets.values(), *frame_groups(sets["test"]).values()], config.batch_size
  )
  step, optimizer, eval_loss = _step_fn(potential, config)
  state = _initial_state(potential, train_set, optimizer, checkpoint if resume else None, fine_tune)
  history = json.loads(str(state["history"]))
  batches = _batches_fn(potential, frames, config.batch_size, dtype)
  # model selection reads evenly spaced validation frames (neighbouring MD frames are
  # correlated, so a subsample loses little); the final metrics use all of them
  stride = max(1, math.ceil(len(valid_set) / MAX_SELECTION_FRAMES))
  selection = valid_set[::stride] or train_set[:MAX_SELECTION_FRAMES]
  check = _Validation(eval_loss, list(batches(selection)), len(selection))
  rng = np.random.default_rng(config.seed + 1)
  for _ in range(state["epoch"]):  # replay the shuffles of completed epochs when resuming
    rng.permutation(len(train_set))
  steps_per_epoch = max(1, math.ceil(len(train_set) / config.batch_size))
  budget = budget_of(
    config,
    steps_per_epoch,
    clock=clock,
    started=started,
    spent=float(state["elapsed"]),
    reserve=0.02 * 60 * (config.budget_minutes or 0.0),  # until the costs are measured
  )
  warm = float(state["warm_progress"])
  sched = Schedule(config, config.warmup_epochs * steps_per_epoch, None if warm < 0 else warm)
  bar = _progress_bar(config, budget, int(state["epoch"])) if progress else None
  done = int(state["step"]) > 0 and budget.exhausted(int(state["step"]))  # fresh: >= 1 step
  safe = _weights(state)  # of the epoch with the lowest training loss (in memory only)
  while not done:
    order = [train_set[j] for j in rng.permutation(len(train_set))]
    losses, lr = _epoch(step, batches(order), state, budget, sched, clock)
    epoch, v, done = int(state["epoch"]) + 1, None, budget.exhausted(int(state["step"]))
    diverged, safe = _guard(state, safe, losses, epoch)
    if done or check.due(clock()):  # the last epoch is always validated
      v = _validate(check, state, epoch, clock)
      budget.reserve = _finish_seconds(potential, config, sizes, check, shapes)
    record = {
      "epoch": epoch,
      "train_loss": float(np.mean(losses)),
      "valid_loss": v,
      "lr": lr,
      "seconds": round(budget.used(), 1),
      **({"diverged": True} if diverged else {}),
    }
    history.append(record)
    warm = -1.0 if sched.warm_progress is None else sched.warm_progress
    state.update(
      epoch=epoch, elapsed=budget.used(), warm_progress=warm, history=json.dumps(history)
    )
    if checkpoint:
      save_checkpoint(checkpoint, state)
    if log:
      log(record)
    if bar is not None:
      _show(bar, config, budget, int(state["step"]), record)
  if bar is not None:
    bar.close()
  if fine_tune:
    keep = ("training", "provenance", "test_metrics", "fine_tuned_from")  # a chain of fine-tunes
    earlier = {k: potential.metadata[k] for k in keep if k in potential.metadata}
    potential = potential.replace(metadata={**potential.metadata, "fine_tuned_from": earlier})
  return _finish(potential, frames, parts, state, config, dtype, history, budget)


def _epoch(step, batches, state: dict, budget, sched, clock):
  """One pass over ``batches`` (the shuffled training frames), or until the budget runs out
  after at least one step: ``state``'s parameters, EMA, optimiser state, step and optimisation
  seconds are updated in place. Returns the batch losses and the last learning rate."""
  config = sched.config
  t, lr, losses, t0 = int(state["step"]), 0.0, [], clock()
  late = budget.progress(t) >= 1 - config.late_fraction and config.late_energy_weight is not None
  e_weight = config.late_energy_weight if late else config.energy_weight
  params, ema, opt_state = state["params"], state["ema"], state["opt_state"]
  pending = None  # the loss of the step in flight: read one step late
  for bt in batches:
    p = budget.progress(t)
    if p >= 1.0 and (losses or pending is not None):  # out of time mid-epoch
      break
    lr = sched(t, p) * float(state["lr_scale"])
    decay = min(config.ema_decay, (1 + t) / (10 + t))
    params, ema, opt_state, l = step(params, ema, opt_state, bt, lr, e_weight, decay)
    # waiting for the step before this one (not this one) lets the next batch be packed
    # while this step runs, and keeps one step in flight, so the clock still counts steps
    if pending is not None:
      losses.append(float(pending))
    pending, t = l, t + 1
  if pending is not None:
    losses.append(float(pending))
  seconds = float(state["optimisation_seconds"]) + clock() - t0
  state.update(params=params, ema=ema, opt_state=opt_state, step=t, optimisation_seconds=seconds)
  return losses, lr


def _weights(state: dict) -> dict:
  return {k: state[k] for k in ("params", "ema", "opt_state")}


def _guard(state: dict, safe: dict, losses: list, epoch: int):
  """After an epoch with these batch losses: ``(diverged, safe)``. A diverged epoch puts the
  weights ``safe`` (of the lowest-loss epoch) back into ``state``; an epoch with a new lowest
  loss becomes the new ``safe``."""
  lowest = float(state["lowest_loss"])
  if _diverged(state, losses, epoch):
    state.update(safe)
    return True, safe
  return False, _weights(state) if float(state["lowest_loss"]) < lowest else safe


def _diverged(state: dict, losses: list, epoch: int) -> bool:
  """Whether the epoch with these batch losses diverged (then the learning rate is halved);
  else its mean becomes the lowest if it is."""
  mean = float(np.mean(losses))
  if np.isfinite(mean) and mean <= DIVERGED * float(state["lowest_loss"]):
    state["lowest_loss"] = min(float(state["lowest_loss"]), mean)
    return False
  state["lr_scale"] = float(state["lr_scale"]) / 2
  if state["lr_scale"] < 0.5**MAX_HALVINGS:
    raise FloatingPointError(
      f"training diverged at epoch {epoch} again after {MAX_HALVINGS} halvings of the learning "
      "rate: lower it (--lr) or check the data for outliers"
    )
  warnings.warn(
    f"training diverged at epoch {epoch} (mean loss {mean:.3g}, lowest "
    f"{float(state['lowest_loss']):.3g}): back to the weights of that epoch, learning rate x"
    f"{state['lr_scale']:g} from now on",
    RuntimeWarning,
    stacklevel=3,
  )
  return True


def _validate(check, state: dict, epoch: int, clock) -> float:
  """The validation loss of ``state``'s EMA weights, kept as the best if it is."""
  v = check(state["ema"], clock)
  if not np.isfinite(v):
    raise FloatingPointError(
      f"validation loss became {v} at epoch {epoch}; lower the learning rate"
    )
  if v < state["best_loss"]:
    state["best_loss"], state["best_params"] = v, state["ema"]
  return v


def _progress_bar(config: TrainConfig, budget, epoch: int):
  """A bar in epochs for an epoch-bounded run, else in percent of the budget's training time."""
  from tqdm.auto import tqdm  # only a display dependency

  if budget.seconds is None:
    return tqdm(total=config.epochs, initial=epoch, unit="epoch", dynamic_ncols=True)
  return tqdm(
    total=100,
    unit="%",
    dynamic_ncols=True,
    bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
  )


def _show(bar, config: TrainConfig, budget, step: int, record: dict) -> None:
  v = record["valid_loss"]
  bar.set_postfix(
    epoch=record["epoch"],
    loss=f"{record['train_loss']:.4g}" if record["train_loss"] is not None else "-",
    **({"valid": f"{v:.4g}"} if v is not None else {}),
    lr=f"{record['lr']:.2g}",
  )
  if budget.seconds is None:
    bar.update(1)
  else:
    bar.n = round(100 * budget.progress(step))
    bar.refresh()


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
  from a fresh initialisation with key ``fold_in(PRNGKey(config.seed), k)``); stacked
  (:meth:`Potential.stack`), evaluated and calibrated on the validation frames. ``config``'s
  budget covers the whole committee: each member gets an equal share of what is left when it
  starts, less the committee's own evaluation. ``checkpoint``: one file per member (``PATH.k``)."""
  if members < 2 or potential.config.committee != 1:
    raise ValueError(f"a committee needs members >= 2 single models, got members={members}")
  if potential.config.force_heads:
    raise ValueError(
      "a committee differentiates its members' forces and has no force readout: train it "
      "from a model without force_heads (potentials.training.without_readout)"
    )
  clock = kwargs.pop("clock", time.perf_counter)
  start = kwargs.pop("started", None)
  start = clock() if start is None else start
  frames = list(frames)
  parts = split_parts(frames, config)  # the batch size leaves the split as it is
  config = with_batch_size(config, [frames[i] for i in parts["train"]])
  minutes, finish, trained = config.budget_minutes, 0.0, []
  for k in range(members):
    p = potential
    if k:
      key = jax.random.fold_in(jax.random.PRNGKey(config.seed), k)
      p = potential.replace(params=init_params(potential.config, len(potential.species), key))
    member = config
    if minutes is not None:  # what is left, less the committee's evaluation, shared equally
      left = 60 * minutes - (clock() - start) - finish
      member = dataclasses.replace(config, time_limit=max(left / (members - k), 1.0) / 60)
    ckpt = f"{checkpoint}.{k}" if checkpoint else None
    trained.append(train(p, frames, member, checkpoint=ckpt, clock=clock, **kwargs))
    # the stacked committee's evaluation: about members x one member's
    finish = members * trained[0].potential.metadata["training"]["finish_seconds"]
  committee = Potential.stack([r.potential for r in trained])
  dtype = kwargs.get("dtype", jnp.float32)
  sets = {k: [frames[i] for i in idx] for k, idx in parts.items()}
  meta = dict(trained[0].potential.metadata)
  meta["training"] = dict(
    meta["training"],
    config=dataclasses.asdict(config),
    committee=[r.potential.metadata["training"]["epochs_run"] for r in trained],
    member_minutes=[r.potential.metadata["training"]["config"]["time_limit"] for r in trained],
    seconds=clock() - start,
    training_seconds=sum(r.potential.metadata["training"]["training_seconds"] for r in trained),
  )
  meta["member_test_metrics"] = [r.metrics["test"] for r in trained]
  committee, metrics = _evaluated(committee.replace(metadata=meta), sets, config, dtype)
  history = [dict(h, member=k) for k, r in enumerate(trained) for h in r.history]
  return TrainResult(committee, history, metrics, clock() - start)


def _evaluated(potential: Potential, sets: dict, config: TrainConfig, dtype):
  """``(potential, metrics)``: metrics on every split part, the test ones (overall and by
  group) in the metadata; an ensemble also calibrated on the validation frames, with its
  uncertainty measures on the test frames (``test_uncertainty``)."""
  metrics = {k: error_metrics(potential, v, config.batch_size, dtype) for k, v in sets.items()}
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


def _finish(potential, frames, parts, state, config, dtype, history, budget) -> TrainResult:
  """The best parameters with refitted shifts, evaluated on every split part."""
  finish_start = budget.used()
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
  meta = dict(best.metadata)
  meta.update(
    {
      "training": {
        "config": dataclasses.asdict(config),
        "frames": len(frames),
        "split": [len(parts[k]) for k in ("train", "valid", "test")],
        "split_parts": {k: split_summary(frames, idx) for k, idx in parts.items()},
        "epochs_run": int(state["epoch"]),
        "steps": int(state["step"]),
        "optimisation_seconds": float(state["optimisation_seconds"]),
        "budget_seconds": budget.seconds,
        "training_seconds": float(state["elapsed"]),
        "reserved_seconds": budget.reserve,
        "best_valid_loss": float(state["best_loss"]),
      },
    }
  )
  best, metrics = _evaluated(best.replace(metadata=meta), sets, config, dtype)
  seconds = budget.used()
  training = dict(best.metadata["training"], seconds=seconds, finish_seconds=seconds - finish_start)
  best = best.replace(metadata={**best.metadata, "training": training})
  return TrainResult(best, history, metrics, seconds)
