"""Fitting a :class:`potentials.Potential` to energies, forces and stresses.

The data side is neutral: a list of :class:`Frame` records (atomic numbers, positions, cell,
periodicity, reference labels) with their pair lists already built (``plugin.data`` reads any
ASE-readable file and builds them). Frames are packed into fixed-capacity padded batches (one
compilation for the whole run), energies are fitted per atom, forces per component and
stresses per component, with weights.

Checkpoints are msgpack files (no pickle) holding parameters, optimiser state, epoch, best
validation loss and the RNG state, so training resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from .potential import Potential


@dataclasses.dataclass
class Frame:
  """One labelled structure with its full pair list (``r = R[src] - R[dst] + shifts @ cell``).

  ``energy`` in eV, ``forces`` (N, 3) eV/Å, ``stress`` (3, 3) eV/Å^3 in ASE's sign convention
  (``(1/V) dE/dε``) or None where not labelled.
  """
  numbers: np.ndarray
  positions: np.ndarray
  cell: np.ndarray
  pbc: np.ndarray
  dst: np.ndarray
  src: np.ndarray
  shifts: np.ndarray
  energy: Optional[float] = None
  forces: Optional[np.ndarray] = None
  stress: Optional[np.ndarray] = None
  trajectory: Optional[str] = None    # id of the MD run the frame came from (held-out splits)
  config_type: Optional[str] = None   # kind of structure; splits are stratified by it
  temperature: Optional[float] = None  # thermostat target (K), to stratify and report by

  @property
  def num_atoms(self) -> int:
    return len(self.numbers)

  @property
  def volume(self) -> float:
    return abs(float(np.linalg.det(self.cell))) if np.all(self.pbc) else 0.0


SPLITS = ("trajectory", "random")
MAX_SELECTION_FRAMES = 256  # validation frames read per epoch to pick the best weights
OPTIMIZERS = ("adam", "amsgrad")
LOSSES = ("mse", "huber")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training hyperparameters (every field is stored in model files).

  Attributes:
    epochs: passes over the training set (an upper bound when ``time_limit`` is set).
    batch_size: frames per batch (batches are padded to a fixed atom and pair capacity).
    learning_rate: peak learning rate; warm-up over ``warmup_epochs`` then cosine decay to
      ``learning_rate * final_lr_fraction`` at the last epoch (or at the time limit).
    energy_weight, forces_weight, stress_weight: loss weights for (per-atom energy error)^2 in
      eV^2, (force component error)^2 in (eV/Å)^2 and (stress component error)^2 in
      (eV/Å^3)^2 (stress errors are multiplied by 100 first so all terms are O(1)).
    late_energy_weight: energy weight for the last ``late_fraction`` of training (None: no
      change); raising it late sharpens energies once forces have converged.
    valid_fraction, test_fraction: split of the frames (fixed ``seed``).
    split: 'trajectory' holds out whole trajectories (``Frame.trajectory``; contiguous time
      blocks where a kind of structure has too few), stratified by config_type and
      temperature: frames of one MD run are correlated, so a random split leaks. 'random'
      draws frames at random (for comparison with published random-split figures).
    random_test_fraction: with the trajectory split, this fraction of the training
      trajectories' frames is withheld at random and reported as ``test_random``: what a
      random split would claim, stored beside the held-out figure.
    clip_norm: global gradient-norm clipping.
    optimizer: 'amsgrad' or 'adam'.
    ema_decay: decay of the exponential moving average of the weights used for validation,
      the kept best model and the saved model (0: no averaging).
    loss: 'mse' or 'huber' (``huber_delta`` in the units of each weighted term's error).
    time_limit: wall-clock budget in minutes (None: none). The schedule is fitted to it after
      the first epoch, and training stops cleanly with the best weights when it runs out.
    seed: split, shuffling and initialisation.
  """
  epochs: int = 100
  batch_size: int = 16
  learning_rate: float = 2e-3
  warmup_epochs: int = 2
  final_lr_fraction: float = 0.01
  energy_weight: float = 1.0
  forces_weight: float = 10.0
  stress_weight: float = 1.0
  late_energy_weight: Optional[float] = None
  late_fraction: float = 0.2
  valid_fraction: float = 0.1
  test_fraction: float = 0.1
  split: str = "trajectory"
  random_test_fraction: float = 0.05
  clip_norm: float = 10.0
  optimizer: str = "amsgrad"  # trained better than adam at equal time (training_ablation.py)
  ema_decay: float = 0.0
  loss: str = "mse"
  huber_delta: float = 0.01
  time_limit: Optional[float] = None
  seed: int = 0

  def __post_init__(self):
    for name, value, allowed in (("split", self.split, SPLITS),
                                 ("optimizer", self.optimizer, OPTIMIZERS),
                                 ("loss", self.loss, LOSSES)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.time_limit is not None and self.time_limit <= 0:
      raise ValueError(f"time_limit must be > 0 minutes, got {self.time_limit}")
    if not 0 <= self.late_fraction < 1:
      raise ValueError(f"late_fraction must be in [0, 1), got {self.late_fraction}")

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    """From a stored config; files written before an option used the old behaviour (random
    split, adam)."""
    return cls(**{"split": "random", "optimizer": "adam", **d})


# ----------------------------------------------------------------------------- batching
@dataclasses.dataclass
class Batch:
  """Frames packed into one padded system (numpy; moved to the device per step)."""
  species: np.ndarray     # (A,) int32
  positions: np.ndarray   # (A, 3)
  atom_frame: np.ndarray  # (A,) frame slot of each atom; padding -> B
  atom_mask: np.ndarray   # (A,) bool
  dst: np.ndarray         # (E,) int32, padding = A
  src: np.ndarray
  shifts: np.ndarray      # (E, 3)
  pair_frame: np.ndarray  # (E,) frame slot of each pair's centre
  cells: np.ndarray       # (B, 3, 3)
  volumes: np.ndarray     # (B,) 0 for non-periodic
  num_atoms: np.ndarray   # (B,) 0 for empty slots
  energy: np.ndarray      # (B,)
  forces: np.ndarray      # (A, 3)
  stress: np.ndarray      # (B, 3, 3)
  has_energy: np.ndarray  # (B,) bool
  has_forces: np.ndarray  # (A,) bool
  has_stress: np.ndarray  # (B,) bool


def batch_capacity(frames: Sequence[Frame], batch_size: int) -> Tuple[int, int]:
  """Atom and pair capacity that fits any ``batch_size`` frames of this set."""
  atoms = sorted((f.num_atoms for f in frames), reverse=True)[:batch_size]
  pairs = sorted((len(f.dst) for f in frames), reverse=True)[:batch_size]
  return int(sum(atoms)) + 1, int(sum(pairs)) + 1


def make_batch(frames: Sequence[Frame], potential: Potential, batch_size: int,
               atom_capacity: int, pair_capacity: int) -> Batch:
  """Pack up to ``batch_size`` frames into one padded system."""
  A, E, B = atom_capacity, pair_capacity, batch_size
  b = Batch(species=np.zeros(A, np.int32), positions=np.zeros((A, 3)),
            atom_frame=np.full(A, B, np.int32), atom_mask=np.zeros(A, bool),
            dst=np.full(E, A, np.int32), src=np.full(E, A, np.int32), shifts=np.zeros((E, 3)),
            pair_frame=np.full(E, B, np.int32), cells=np.zeros((B, 3, 3)), volumes=np.zeros(B),
            num_atoms=np.zeros(B), energy=np.zeros(B), forces=np.zeros((A, 3)),
            stress=np.zeros((B, 3, 3)), has_energy=np.zeros(B, bool),
            has_forces=np.zeros(A, bool), has_stress=np.zeros(B, bool))
  a = e = 0
  for k, f in enumerate(frames):
    n, m = f.num_atoms, len(f.dst)
    if a + n > A or e + m > E:
      raise ValueError("batch capacity exceeded")
    sl, pl = slice(a, a + n), slice(e, e + m)
    b.species[sl] = potential.species_index(f.numbers)
    b.positions[sl] = f.positions
    b.atom_frame[sl] = k
    b.atom_mask[sl] = True
    b.dst[pl], b.src[pl] = f.dst + a, f.src + a
    b.shifts[pl] = f.shifts
    b.pair_frame[pl] = k
    b.cells[k] = f.cell
    b.volumes[k] = f.volume
    b.num_atoms[k] = n
    if f.energy is not None:
      b.energy[k], b.has_energy[k] = f.energy, True
    if f.forces is not None:
      b.forces[sl], b.has_forces[sl] = f.forces, True
    if f.stress is not None and f.volume > 0:
      b.stress[k], b.has_stress[k] = f.stress, True
    a, e = a + n, e + m
  return b


# ----------------------------------------------------------------------------- predictions
def predict_fn(potential: Potential) -> Callable:
  """``f(params, batch) -> (energy (B,), forces (A, 3), stress (B, 3, 3))`` for a Batch.

  Stress is ``(1/V) dE/dε`` of a symmetric strain applied to each frame's positions and cell
  (ASE's sign), 0 for non-periodic frames.
  """
  atomic = potential.pair_energies_fn(include_shift=True)

  def energies(params, strain, bt):
    B = bt["cells"].shape[0]
    deform = jnp.eye(3, dtype=strain.dtype) + 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
    deform_pad = jnp.concatenate([deform, jnp.eye(3, dtype=strain.dtype)[None]])
    pos = jnp.einsum("ai,aij->aj", bt["positions"], deform_pad[bt["atom_frame"]])
    cells = jnp.einsum("bij,bjk->bik", bt["cells"], deform)
    cells = jnp.concatenate([cells, jnp.zeros((1, 3, 3), cells.dtype)])
    r = (jnp.take(pos, bt["src"], axis=0, mode="fill", fill_value=0)
         - jnp.take(pos, bt["dst"], axis=0, mode="fill", fill_value=0)
         + jnp.einsum("ei,eij->ej", bt["shifts"], cells[bt["pair_frame"]]))
    e_atom = atomic(params, bt["species"], r, bt["dst"], bt["src"], bt["atom_mask"],
                    indices_are_sorted=True)
    return jax.ops.segment_sum(e_atom, bt["atom_frame"], num_segments=B)

  def predict(params, bt):
    B = bt["cells"].shape[0]
    strain = jnp.zeros((B, 3, 3), bt["positions"].dtype)

    def total(positions, strain):
      e = energies(params, strain, {**bt, "positions": positions})
      return jnp.sum(e), e
    (_, e), (g_pos, g_strain) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        bt["positions"], strain)
    vol = jnp.where(bt["volumes"] > 0, bt["volumes"], 1.0)
    stress = jnp.where((bt["volumes"] > 0)[:, None, None], g_strain / vol[:, None, None], 0.0)
    return e, -g_pos, stress
  return predict


def _device_batch(b: Batch, dtype) -> dict:
  out = {}
  for k, v in dataclasses.asdict(b).items():
    v = np.asarray(v)
    out[k] = jnp.asarray(v, dtype) if v.dtype.kind == "f" else jnp.asarray(v)
  return out


def loss_fn(potential: Potential, config: TrainConfig) -> Callable:
  """``loss(params, batch, energy_weight=config.energy_weight) -> (total, (e, f, s))``."""
  predict = predict_fn(potential)
  if config.loss == "huber":
    d = config.huber_delta
    penalty = lambda x: jnp.where(jnp.abs(x) < d, x**2, 2 * d * jnp.abs(x) - d**2)
  else:
    penalty = jnp.square

  def loss(params, bt, energy_weight=config.energy_weight):
    e, f, s = predict(params, bt)
    n = jnp.maximum(bt["num_atoms"], 1)
    de = jnp.where(bt["has_energy"], (e - bt["energy"]) / n, 0.0)
    df = jnp.where(bt["has_forces"][:, None], f - bt["forces"], 0.0)
    ds = jnp.where(bt["has_stress"][:, None, None], (s - bt["stress"]) * 100.0, 0.0)
    le = jnp.sum(penalty(de)) / jnp.maximum(jnp.sum(bt["has_energy"]), 1)
    lf = jnp.sum(penalty(df)) / jnp.maximum(3 * jnp.sum(bt["has_forces"]), 1)
    ls = jnp.sum(penalty(ds)) / jnp.maximum(9 * jnp.sum(bt["has_stress"]), 1)
    total = energy_weight * le + config.forces_weight * lf + config.stress_weight * ls
    return total, (e, f, s)
  return loss


# ----------------------------------------------------------------------------- shifts
def fit_element_shifts(potential: Potential, frames: Sequence[Frame],
                       baseline: Optional[Sequence[float]] = None) -> np.ndarray:
  """Least-squares per-element energies ``E - baseline ≈ sum_s count_s * shift_s`` over
  ``frames`` (``baseline``: one energy per frame, default 0)."""
  rows, ys = [], []
  for i, f in enumerate(frames):
    if f.energy is None:
      continue
    rows.append(np.bincount(potential.species_index(f.numbers), minlength=len(potential.species)))
    ys.append(f.energy - (baseline[i] if baseline is not None else 0.0))
  if not rows:
    return np.zeros(len(potential.species))
  a, y = np.asarray(rows, np.float64), np.asarray(ys)
  # Minimum-norm least squares: species that always appear in the same ratio (one molecule)
  # make the system rank deficient; the split between them is then arbitrary, the sum right.
  return np.linalg.lstsq(a, y, rcond=None)[0]


# ----------------------------------------------------------------------------- checkpoints
_CKPT_MAGIC = b"EQATTN-CKPT\n"


def save_checkpoint(path, state: dict) -> None:
  payload = serialization.msgpack_serialize(serialization.to_state_dict(state))
  data = _CKPT_MAGIC + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + payload
  tmp = Path(str(path) + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def load_checkpoint(path, template: dict) -> dict:
  data = Path(path).read_bytes()
  head = len(_CKPT_MAGIC) + 8 + 32
  if not data.startswith(_CKPT_MAGIC) or len(data) < head:
    raise ValueError(f"{path} is not an eqattn training checkpoint")
  (length,) = struct.unpack_from("<Q", data, len(_CKPT_MAGIC))
  payload = data[head:]
  if len(payload) != length or hashlib.sha256(payload).digest() != data[head - 32:head]:
    raise ValueError(f"{path} is truncated or corrupt")
  try:
    return serialization.from_state_dict(template, serialization.msgpack_restore(payload))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} does not match this training run (another model, optimiser or "
                     f"an older eqattn): delete it or train with resume=False ({e})") from None


# ----------------------------------------------------------------------------- metrics
_PREDICT_CACHE: Dict[tuple, Callable] = {}


def _jitted_predict(config, species) -> Callable:
  """One jitted predictor per architecture (parameters are arguments): evaluating train,
  validation and test sets, or several checkpoints, compiles once per batch shape."""
  key = (config, tuple(species))
  if key not in _PREDICT_CACHE:
    _PREDICT_CACHE[key] = jax.jit(predict_fn(Potential(config, tuple(species), None)))
  return _PREDICT_CACHE[key]


def _predictions(potential: Potential, frames: Sequence[Frame], batch_size: int, dtype):
  """Yields ``(batch, frames in it, (energies, forces, stress))`` as float64 NumPy arrays."""
  predict = _jitted_predict(potential.config, potential.species)
  cap = batch_capacity(frames, batch_size)
  for i in range(0, len(frames), batch_size):
    chunk = frames[i:i + batch_size]
    b = make_batch(chunk, potential, batch_size, *cap)
    out = predict(potential.params, _device_batch(b, dtype))
    yield b, len(chunk), tuple(np.asarray(x, np.float64) for x in out)


def evaluate(potential: Potential, frames: Sequence[Frame], batch_size: int = 16,
             dtype=jnp.float32) -> Dict[str, float]:
  """MAE/RMSE of energy (per atom and total, eV), forces (eV/Å) and stress (eV/Å^3)."""
  if not frames:
    return {}
  err: Dict[str, List[np.ndarray]] = {"e": [], "e_atom": [], "f": [], "s": []}
  for b, k, (e, f, s) in _predictions(potential, frames, batch_size, dtype):
    he = b.has_energy[:k]
    err["e"].append((e[:k] - b.energy[:k])[he])
    err["e_atom"].append(((e[:k] - b.energy[:k]) / np.maximum(b.num_atoms[:k], 1))[he])
    err["f"].append((f - b.forces)[b.has_forces].ravel())
    err["s"].append((s[:k] - b.stress[:k])[b.has_stress[:k]].ravel())
  out = {}
  names = {"e": "energy", "e_atom": "energy_per_atom", "f": "forces", "s": "stress"}
  for key, vals in err.items():
    v = np.concatenate(vals) if vals else np.zeros(0)
    if v.size:
      out[f"{names[key]}_mae"] = float(np.mean(np.abs(v)))
      out[f"{names[key]}_rmse"] = float(np.sqrt(np.mean(v**2)))
  return out


def predict_energies(potential: Potential, frames: Sequence[Frame], batch_size: int = 16,
                     dtype=jnp.float32) -> np.ndarray:
  """``(len(frames),)`` model energies (eV)."""
  out = [e[:k] for _, k, (e, _, _) in _predictions(potential, frames, batch_size, dtype)]
  return np.concatenate(out) if out else np.zeros(0)


def refit_shifts(potential: Potential, frames: Sequence[Frame], batch_size: int = 16,
                 dtype=jnp.float32) -> Potential:
  """The same network with its per-element shifts moved by the least-squares fit of the
  energy residuals on ``frames``: the best shifts for the trained network. Gradient training
  leaves a small uniform per-atom offset (~1 meV/atom for copper); this removes it."""
  if not any(f.energy is not None for f in frames):
    return potential
  delta = fit_element_shifts(potential, frames, predict_energies(potential, frames, batch_size,
                                                                 dtype))
  params = dict(potential.params)
  params["shift"] = np.asarray(np.asarray(params["shift"], np.float64) + delta, np.float32)
  return potential.replace(params=params)


def split_frames(frames: Union[int, Sequence[Frame]], config: TrainConfig
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Train / validation / test indices from a fixed seed (``config.split``; an int is a
  number of untagged frames and always splits at random)."""
  parts = split_parts(frames, config)
  return parts["train"], parts["valid"], parts["test"]


def split_parts(frames: Union[int, Sequence[Frame]], config: TrainConfig
                ) -> Dict[str, np.ndarray]:
  """``{"train", "valid", "test", "test_random"}`` indices. With the trajectory split,
  ``test`` is whole held-out trajectories and ``test_random`` a random
  ``random_test_fraction`` of the training trajectories' frames, withheld from training: the
  figure a random split would report, beside the honest one. With the random split both
  test parts are the same frames."""
  if isinstance(frames, (int, np.integer)) or config.split == "random":
    n = frames if isinstance(frames, (int, np.integer)) else len(frames)
    train, valid, test = _random_split(int(n), config)
    return {"train": train, "valid": valid, "test": test, "test_random": test}
  train, valid, test = _trajectory_split(frames, config)
  rng = np.random.default_rng([config.seed, 1])
  pick = np.zeros(len(train), bool)
  pick[rng.permutation(len(train))[:int(round(config.random_test_fraction * len(train)))]] = True
  if pick.all():
    raise ValueError(f"{len(frames)} frames are too few for the requested split")
  return {"train": train[~pick], "valid": valid, "test": test, "test_random": train[pick]}


def _random_split(n: int, config: TrainConfig):
  perm = np.random.default_rng(config.seed).permutation(n)
  n_test = int(round(config.test_fraction * n))
  n_valid = int(round(config.valid_fraction * n))
  if n - n_test - n_valid < 1:
    raise ValueError(f"{n} frames are too few for the requested validation/test split")
  return perm[n_test + n_valid:], perm[n_test:n_test + n_valid], perm[:n_test]


def _strata(frames: Sequence[Frame]) -> List[List[List[int]]]:
  """Frame indices grouped into trajectories (in file order), and trajectories into strata:
  one per (config_type, temperature) with >= 3 trajectories, the rest of a config_type
  pooled. Untagged frames form one trajectory per config_type."""
  trajs: Dict[tuple, List[int]] = {}
  for i, f in enumerate(frames):
    key = (f.config_type, f.trajectory if f.trajectory is not None else f.config_type)
    trajs.setdefault(key, []).append(i)
  by_kind: Dict[Any, Dict[Any, List[List[int]]]] = {}
  for (kind, _), idx in trajs.items():
    by_kind.setdefault(kind, {}).setdefault(frames[idx[0]].temperature, []).append(idx)
  strata = []
  for temps in by_kind.values():
    pooled = []
    for group in temps.values():
      (strata.append(group) if len(group) >= 3 else pooled.extend(group))
    if pooled:
      strata.append(pooled)
  return strata


def _trajectory_split(frames: Sequence[Frame], config: TrainConfig):
  """Whole trajectories to test/valid/train per stratum; a stratum with fewer than 3
  trajectories is cut into contiguous time blocks instead (train first, test last)."""
  rng = np.random.default_rng(config.seed)
  out: Tuple[List[int], List[int], List[int]] = ([], [], [])
  for stratum in _strata(frames):
    if len(stratum) >= 3:
      order = rng.permutation(len(stratum))
      n_test = max(1, int(round(config.test_fraction * len(stratum))))
      n_valid = max(1, int(round(config.valid_fraction * len(stratum))))
      for rank, t in enumerate(order):
        part = 2 if rank < n_test else 1 if rank < n_test + n_valid else 0
        out[part].extend(stratum[t])
    else:
      for idx in stratum:
        n = len(idx)
        n_test = int(round(config.test_fraction * n))
        n_valid = int(round(config.valid_fraction * n))
        out[0].extend(idx[:n - n_test - n_valid])
        out[1].extend(idx[n - n_test - n_valid:n - n_test])
        out[2].extend(idx[n - n_test:])
  if not out[0]:
    raise ValueError(f"{len(frames)} frames are too few for the requested validation/test split")
  return tuple(np.asarray(sorted(o), np.int64) for o in out)


def split_summary(frames: Sequence[Frame], idx: np.ndarray) -> dict:
  """Which trajectories a split part holds (stored in model files; used by ``eqattn eval``)."""
  return {"frames": int(len(idx)),
          "trajectories": sorted({str(frames[i].trajectory) for i in idx
                                  if frames[i].trajectory is not None})}


def grouped_metrics(potential: Potential, frames: Sequence[Frame], batch_size: int = 16,
                    dtype=jnp.float32) -> Dict[str, Dict[str, float]]:
  """:func:`evaluate` per config_type and per temperature (keys 'config_type=...',
  'T=...K'), for tables of held-out error against temperature."""
  groups: Dict[str, List[Frame]] = {}
  for f in frames:
    if f.config_type is not None:
      groups.setdefault(f"config_type={f.config_type}", []).append(f)
    if f.temperature is not None:
      groups.setdefault(f"T={f.temperature:g}K", []).append(f)
  return {k: evaluate(potential, v, batch_size, dtype) for k, v in sorted(groups.items())}


# ----------------------------------------------------------------------------- training
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
  f_all = np.concatenate([f.forces.ravel() for f in train_set if f.forces is not None] or
                         [np.ones(1)])
  scale = max(float(np.sqrt(np.mean(f_all**2))), 1e-3)
  return {**params, "shift": jnp.asarray(shifts, jnp.float32),
          "scale": jnp.full(len(potential.species), scale, jnp.float32)}


def _planned_epochs(config: TrainConfig, done: int, elapsed: float, epoch_seconds: float) -> int:
  """Epochs that fit the time limit at the measured pace (at least the ones done)."""
  if config.time_limit is None:
    return config.epochs
  left = config.time_limit * 60 - elapsed
  return max(done, min(config.epochs, done + int(left // max(epoch_seconds, 1e-9))))


def train(potential: Potential, frames: Sequence[Frame], config: TrainConfig = TrainConfig(), *,
          checkpoint: Optional[str] = None, resume: bool = True, progress: bool = True,
          dtype=jnp.float32, log: Optional[Callable[[dict], None]] = None) -> TrainResult:
  """Fit ``potential`` (its config and species fixed) to ``frames``.

  Per-element shifts are fitted by least squares before training and the energy scale is set
  from the force RMS. The best (EMA) parameters on the validation set are kept; with
  ``checkpoint`` a checkpoint is written after every epoch and, with ``resume``, an existing
  one is continued (the time limit counts the time already spent). Returns the best
  potential, with its split and test metrics in ``metadata``.
  """
  start = time.perf_counter()
  frames = list(frames)
  parts = split_parts(frames, config)
  train_set, valid_set = ([frames[i] for i in parts[k]] for k in ("train", "valid"))
  params = _initial_params(potential, train_set)
  step, optimizer, eval_loss = _step_fn(potential, config)
  state = {"params": params, "ema": params, "opt_state": optimizer.init(params), "epoch": 0,
           "step": 0, "elapsed": 0.0, "best_loss": np.inf, "best_params": params,
           "history": "[]"}
  if checkpoint and resume and Path(checkpoint).exists():
    state = load_checkpoint(checkpoint, state)
  history = json.loads(str(state["history"]))
  cap = batch_capacity(frames, config.batch_size)
  batches = lambda subset: (_device_batch(make_batch(subset[i:i + config.batch_size], potential,
                                                     config.batch_size, *cap), dtype)
                            for i in range(0, len(subset), config.batch_size))
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
    v = (float(np.mean([float(eval_loss(ema, bt)) for bt in valid_batches]))
         if valid_batches else float(np.mean(losses)))
    if not np.isfinite(v):
      raise FloatingPointError(f"validation loss became {v} at epoch {epoch + 1}; lower the "
                               "learning rate")
    if v < state["best_loss"]:
      state["best_loss"], state["best_params"] = v, ema
    now = time.perf_counter()
    elapsed = now - clock0
    # pace of an epoch from this one's steps after the first (compiles), scaled to all steps
    epoch_s = (now - t_first) * len(losses) / max(len(losses) - 1, 1) \
        if len(losses) > 1 else now - t_epoch
    planned = _planned_epochs(config, epoch + 1, elapsed, epoch_s)
    if epoch == first_epoch and config.time_limit and elapsed < config.time_limit * 60:
      planned = max(planned, min(epoch + 2, config.epochs))  # measure the pace once compiled
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "valid_loss": v,
              "lr": lr, "seconds": round(elapsed, 1)}
    history.append(record)
    state.update(params=params, ema=ema, opt_state=opt_state, epoch=epoch + 1, step=t,
                 elapsed=elapsed, history=json.dumps(history))
    if checkpoint:
      save_checkpoint(checkpoint, state)
    if log:
      log(record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['train_loss']:.4g}", valid=f"{v:.4g}")
      bar.update(1)
  if bar is not None:
    bar.close()
  return _finish(potential, frames, parts, state, config, dtype, history, start)


def _finish(potential, frames, parts, state, config, dtype, history, start) -> TrainResult:
  """The best parameters with refitted shifts, evaluated on every split part."""
  sets = {k: [frames[i] for i in idx] for k, idx in parts.items()}
  best = potential.replace(params=jax.tree_util.tree_map(np.asarray, state["best_params"]))
  best = refit_shifts(best, sets["train"], config.batch_size, dtype)
  metrics = {k: evaluate(best, v, config.batch_size, dtype) for k, v in sets.items()}
  seconds = time.perf_counter() - start
  meta = dict(best.metadata)
  meta.update({"training": {"config": dataclasses.asdict(config), "frames": len(frames),
                            "split": [len(parts[k]) for k in ("train", "valid", "test")],
                            "split_parts": {k: split_summary(frames, idx)
                                            for k, idx in parts.items()},
                            "epochs_run": int(state["epoch"]), "seconds": seconds,
                            "training_seconds": float(state["elapsed"]),
                            "best_valid_loss": float(state["best_loss"])},
               "test_metrics": metrics["test"],
               "test_random_metrics": metrics["test_random"],
               "test_metrics_by_group": grouped_metrics(best, sets["test"], config.batch_size,
                                                        dtype)})
  return TrainResult(best.replace(metadata=meta), history, metrics, seconds)
