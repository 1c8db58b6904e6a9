"""Predictions and error metrics of a potential on labelled frames (held-out parts included),
and the least-squares per-element energy shifts."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import deprecation, electrostatics, observables
from ..potential import Potential
from .batching import Frame, buckets, device_batch, make_batch


def predict_fn(potential: Potential, members: bool = False) -> Callable:
  """``f(params, batch) -> (energy (B,), forces (A, 3), stress (B, 3, 3))`` for a batch from
  :func:`~potentials.training.device_batch` (:func:`potentials.observables.compute`: stress
  is ``(1/V) dE/dε``, ASE's sign, 0 for non-periodic frames); with ``members``, also the
  members' energies ``(B, M)`` (of the same forward pass; forces are the mean's)."""
  m = potential.num_members
  if potential.config.electrostatics:
    pair_fn = potential.energies_and_charges_from_pairs_fn(include_shift=True)
  elif members:  # columns of the members' energies / M: their sum is the mean's energy
    member_fn = potential.member_energies_fn(include_shift=True)
    pair_fn = lambda *a, **k: member_fn(*a, **k) / m
  else:
    pair_fn = potential.atomic_energies_from_pairs_fn(include_shift=True)

  def predict(params, bt):
    out = batch_observables(pair_fn, params, bt, config=potential.config, volumes=bt["volumes"])
    if members:
      return jnp.sum(out.energy, axis=-1), out.forces, out.stress, out.energy * m
    return out.energy, out.forces, out.stress

  return predict


def batch_observables(
  pair_fn: Callable, params, bt: dict, *, config=None, **options
) -> observables.Observables:
  """:func:`potentials.observables.compute` of a function of pair vectors
  (``atomic_energies_from_pairs_fn`` or ``member_energies_fn``) on a device batch; ``options``
  go to ``compute``. For a model with electrostatics, ``pair_fn`` is its
  ``energies_and_charges_from_pairs_fn`` and ``config`` its :class:`ModelConfig`: the
  charges' long-range term is added per frame."""
  energies = lambda r: pair_fn(
    params,
    species_index=bt["species"],
    r=r,
    dst=bt["dst"],
    src=bt["src"],
    atom_mask=bt["atom_mask"],
    indices_are_sorted=True,
  )
  if config is not None and config.electrostatics:
    frames = electrostatics.Frames(
      bt["atom_frame"],
      bt["atom_mask"],
      bt["total_charge"],
      bt["periodic"],
      bt["kvectors"],
      bt["kmask"],
    )
    options["long_range"] = electrostatics.model_long_range_fn(config, frames, bt["dst"], bt["src"])
  return observables.compute(
    energies,
    bt["positions"],
    dst=bt["dst"],
    src=bt["src"],
    shifts=bt["shifts"],
    cell=bt["cells"],
    atom_frame=bt["atom_frame"],
    pair_frame=bt["pair_frame"],
    **options,
  )


def fit_element_shifts(
  potential: Potential, frames: Sequence[Frame], baseline: Optional[Sequence[float]] = None
) -> np.ndarray:
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


_PREDICT_CACHE: Dict[tuple, Callable] = {}
MAX_ATOMS = 4096  # atoms in one batch of predictions


def _jitted_predict(config, species) -> Callable:
  """One jitted predictor per architecture (parameters are arguments): evaluating train,
  validation and test sets, or several checkpoints, compiles once per batch shape."""
  key = (config, tuple(species))
  if key not in _PREDICT_CACHE:
    _PREDICT_CACHE[key] = jax.jit(predict_fn(Potential(config, tuple(species), None)))
  return _PREDICT_CACHE[key]


def predictions(
  potential: Potential,
  frames: Sequence[Frame],
  *,
  batch_size: int = 16,
  max_atoms: int = MAX_ATOMS,
  dtype=jnp.float32,
):
  """Yields ``(batch, indices, (energies, forces, stress))`` over ``frames`` in size buckets
  (:func:`~potentials.training.batching.buckets`: few compilations for many sizes);
  ``indices`` are the frames in the batch, in its slot order; arrays are float64 NumPy."""
  predict = _jitted_predict(potential.config, potential.species)
  for idx, (B, A, E) in buckets(frames, batch_size, max_atoms):
    b = make_batch([frames[i] for i in idx], potential, B, A, E)
    out = predict(potential.params, device_batch(b, dtype))
    yield b, idx, tuple(np.asarray(x, np.float64) for x in out)


def error_metrics(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> Dict[str, float]:
  """MAE/RMSE of energy (per atom and total, eV), forces (eV/Å) and stress (eV/Å^3)."""
  if not frames:
    return {}
  err: Dict[str, List[np.ndarray]] = {"e": [], "e_atom": [], "f": [], "s": []}
  for b, idx, (e, f, s) in predictions(potential, frames, batch_size=batch_size, dtype=dtype):
    k = len(idx)
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


def evaluate(*args, **kwargs) -> Dict[str, float]:
  """Deprecated name of :func:`error_metrics`."""
  deprecation.warn("potentials.training.evaluate", "potentials.training.error_metrics")
  return error_metrics(*args, **kwargs)


def predict_energies(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> np.ndarray:
  """``(len(frames),)`` model energies (eV)."""
  out = np.zeros(len(frames))
  for _, idx, (e, _, _) in predictions(potential, frames, batch_size=batch_size, dtype=dtype):
    out[idx] = e[: len(idx)]
  return out


def refit_shifts(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> Potential:
  """The same network with its per-element shifts moved by the least-squares fit of the
  energy residuals on ``frames``: the best shifts for the trained network. Gradient training
  leaves a small uniform per-atom offset (~1 meV/atom for copper); this removes it."""
  if not any(f.energy is not None for f in frames):
    return potential
  delta = fit_element_shifts(
    potential, frames, predict_energies(potential, frames, batch_size, dtype)
  )
  params = dict(potential.params)
  params["shift"] = np.asarray(np.asarray(params["shift"], np.float64) + delta, np.float32)
  return potential.replace(params=params)


def grouped_metrics(
  potential: Potential, frames: Sequence[Frame], batch_size: int = 16, dtype=jnp.float32
) -> Dict[str, Dict[str, float]]:
  """:func:`error_metrics` per config_type and per temperature (keys 'config_type=...',
  'T=...K'), for tables of held-out error against temperature."""
  groups = frame_groups(frames)
  return {k: error_metrics(potential, v, batch_size, dtype) for k, v in sorted(groups.items())}


def frame_groups(frames: Sequence[Frame]) -> Dict[str, List[Frame]]:
  """The frames of every config_type and every temperature (:func:`grouped_metrics`' keys)."""
  groups: Dict[str, List[Frame]] = {}
  for f in frames:
    if f.config_type is not None:
      groups.setdefault(f"config_type={f.config_type}", []).append(f)
    if f.temperature is not None:
      groups.setdefault(f"T={f.temperature:g}K", []).append(f)
  return groups


def evaluation_shapes(frame_sets: Sequence[Sequence[Frame]], batch_size: int) -> int:
  """Padded batch shapes, i.e. compilations, that :func:`predictions` of every set needs."""
  return len({cap for frames in frame_sets for _, cap in buckets(frames, batch_size, MAX_ATOMS)})
