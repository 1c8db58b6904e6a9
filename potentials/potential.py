"""``Potential``: a frozen bundle of model config, parameters, species and metadata.

The pure functions it hands out are what the simulator plugins differentiate:

* ``pair_energies_fn()``: ``f(params, species, r, dst, src, atom_mask=None) -> (N,)`` from pair
  vectors (JAX-MD computes them with its own displacement function);
* ``atomic_energies_fn()``: the same from positions, integer image shifts and a cell
  (``r_k = R[src] - R[dst] + shifts_k @ cell``), differentiable in positions and cell (stress).

Convenience methods (``energy``, ``atomic_energies``, ``energy_and_forces``) take NumPy arrays
and atomic numbers and jit once per input shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from .model import EnergyModel, ModelConfig

PRNGLike = Union[int, jax.Array]
ArrayLike = Any

ELEMENTS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge "
    "As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm "
    "Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U "
    "Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split()


class UnknownElementError(ValueError):
  """An atomic number that the model was not trained on."""


def element_symbol(z: int) -> str:
  return ELEMENTS[z] if 0 < z < len(ELEMENTS) else f"Z={z}"


def pair_vectors(positions: jax.Array, dst: jax.Array, src: jax.Array,
                 shifts: Optional[jax.Array] = None, cell: Optional[jax.Array] = None):
  """``R[src] - R[dst] (+ shifts @ cell)``; padded indices (>= N) read position 0 vectors."""
  r = (jnp.take(positions, src, axis=0, mode="fill", fill_value=0)
       - jnp.take(positions, dst, axis=0, mode="fill", fill_value=0))
  if shifts is not None:
    if cell is None:
      raise ValueError("shifts given without a cell")
    r = r + shifts.astype(r.dtype) @ cell.astype(r.dtype)
  return r


@dataclasses.dataclass(frozen=True, eq=False)
class Potential:
  """A trained (or freshly initialised) equivariant self-attention potential.

  Attributes:
    config: hyperparameters (:class:`ModelConfig`).
    species: atomic numbers the model knows, in the order of its species table.
    params: flax parameter pytree.
    metadata: provenance and free-form information (JSON-like values only).
  """
  config: ModelConfig
  species: Tuple[int, ...]
  params: Any
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  # ------------------------------------------------------------------ construction
  @classmethod
  def create(cls, key: PRNGLike = 0, *, species: Sequence[Union[int, str]], cutoff: float = 5.0,
             **hyperparameters) -> "Potential":
    """A randomly initialised potential for ``species`` (atomic numbers or symbols).

    ``hyperparameters`` are :class:`ModelConfig` fields (features, max_degree,
    num_iterations, num_heads, num_basis, radial, cutoff_function, include_pseudotensors,
    use_fused_tensor, repulsion, repulsion_cutoff).
    """
    config = ModelConfig(cutoff=cutoff, **hyperparameters)
    zs = []
    for s in species:
      z = ELEMENTS.index(s) if isinstance(s, str) and s in ELEMENTS[1:] else s
      if not isinstance(z, (int, np.integer)) or not 0 < int(z) < len(ELEMENTS):
        raise ValueError(f"unknown species {s!r}: give atomic numbers or element symbols")
      zs.append(int(z))
    if len(set(zs)) != len(zs) or not zs:
      raise ValueError(f"species must be a non-empty list without repeats, got {list(species)}")
    if isinstance(key, (int, np.integer)):
      key = jax.random.PRNGKey(int(key))
    model = EnergyModel(config, len(zs))
    # A tiny dummy structure fixes every parameter shape (shapes do not depend on N).
    dummy_r = jnp.array([[1.0, 0.2, 0.1], [-1.0, -0.2, -0.1]], jnp.float32)
    idx = jnp.array([0, 1], jnp.int32)
    params = model.init(key, jnp.zeros(2, jnp.int32), dummy_r, idx, idx[::-1])["params"]
    return cls(config, tuple(zs), params, {"created_with": "Potential.create"})

  def replace(self, **changes) -> "Potential":
    return dataclasses.replace(self, **changes)

  @property
  def cutoff(self) -> float:
    return self.config.cutoff

  @property
  def model(self) -> EnergyModel:
    return EnergyModel(self.config, len(self.species))

  @property
  def symbols(self) -> Tuple[str, ...]:
    return tuple(element_symbol(z) for z in self.species)

  # ------------------------------------------------------------------ species
  @functools.cached_property
  def _species_table(self) -> np.ndarray:
    table = np.full(len(ELEMENTS), -1, np.int32)
    table[list(self.species)] = np.arange(len(self.species), dtype=np.int32)
    return table

  def species_index(self, atomic_numbers: ArrayLike) -> np.ndarray:
    """Map atomic numbers to the model's species indices; unknown elements raise."""
    z = np.asarray(atomic_numbers)
    if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer):
      raise ValueError(f"atomic_numbers must be a 1-D integer array, got {z.dtype} {z.shape}")
    bad = (z <= 0) | (z >= len(ELEMENTS))
    idx = np.where(bad, -1, self._species_table[np.clip(z, 0, len(ELEMENTS) - 1)])
    if np.any(idx < 0):
      unknown = sorted({int(v) for v in z[idx < 0]})
      names = ", ".join(f"{element_symbol(v)} (Z={v})" for v in unknown)
      raise UnknownElementError(
          f"element(s) {names} not in this model; it knows {', '.join(self.symbols)}")
    return idx.astype(np.int32)

  # ------------------------------------------------------------------ pure functions
  def pair_energies_fn(self, include_shift: bool = True) -> Callable:
    """``f(params, species, r, dst, src, atom_mask=None, indices_are_sorted=False) -> (N,)``.

    With ``include_shift=False`` the per-element reference energies are left out; add
    ``self.element_shifts[species]`` in float64 on the host (float32 runs keep their precision).
    """
    model = self.model
    zs = jnp.asarray(self.species)

    def f(params, species, r, dst, src, atom_mask=None, indices_are_sorted=False):
      return model.apply({"params": params}, species, r, dst, src, atom_mask, zs,
                         indices_are_sorted, include_shift)
    return f

  @property
  def element_shifts(self) -> np.ndarray:
    """Per-species reference energies (eV, float64): an isolated atom's energy."""
    return np.asarray(self.params["shift"], np.float64)

  def atomic_energies_fn(self, include_shift: bool = True) -> Callable:
    """``f(params, species, positions, dst, src, shifts=None, cell=None, atom_mask=None,
    indices_are_sorted=False) -> (N,)`` per-atom energies (eV)."""
    pair_fn = self.pair_energies_fn(include_shift)

    def f(params, species, positions, dst, src, shifts=None, cell=None, atom_mask=None,
          indices_are_sorted=False):
      r = pair_vectors(positions, dst, src, shifts, cell)
      return pair_fn(params, species, r, dst, src, atom_mask, indices_are_sorted)
    return f

  def energy_fn(self) -> Callable:
    """Like :meth:`atomic_energies_fn` but returns the total energy (a scalar)."""
    f = self.atomic_energies_fn()
    return lambda *a, **k: jnp.sum(f(*a, **k))

  # ------------------------------------------------------------------ convenience
  @functools.cached_property
  def _jitted(self):
    f = self.atomic_energies_fn()

    def energies(params, species, positions, dst, src, shifts, cell):
      return f(params, species, positions, dst, src, shifts, cell)

    def total(params, species, positions, dst, src, shifts, cell):
      return jnp.sum(energies(params, species, positions, dst, src, shifts, cell))

    return {"energies": jax.jit(energies),
            "energy_forces": jax.jit(jax.value_and_grad(total, argnums=2))}

  def _prepare(self, atomic_numbers, positions, dst, src, shifts, cell):
    species = self.species_index(atomic_numbers)
    pos = np.asarray(positions)
    if pos.shape != (len(species), 3):
      raise ValueError(f"positions must have shape ({len(species)}, 3), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
      bad = int(np.argwhere(~np.isfinite(pos).all(axis=1))[0, 0])
      raise ValueError(f"positions of atom {bad} are not finite: {pos[bad]}")
    # float64 input without x64 runs in float32 (JAX's own rule, minus its warning)
    dtype = jax.dtypes.canonicalize_dtype(pos.dtype if pos.dtype in (np.float32, np.float64)
                                          else np.float64)
    dst = jnp.asarray(dst, jnp.int32)
    src = jnp.asarray(src, jnp.int32)
    if shifts is None:
      shifts = np.zeros((len(dst), 3))
      cell = np.zeros((3, 3))
    elif cell is None:
      raise ValueError("shifts given without a cell")
    return (jnp.asarray(species), jnp.asarray(pos, dtype), dst, src,
            jnp.asarray(shifts, dtype), jnp.asarray(cell, dtype))

  def atomic_energies(self, atomic_numbers, positions, dst, src, shifts=None, cell=None):
    """Per-atom energies (eV) as a NumPy array for one structure and its pair list."""
    args = self._prepare(atomic_numbers, positions, dst, src, shifts, cell)
    return np.asarray(self._jitted["energies"](self.params, *args))

  def energy(self, atomic_numbers, positions, dst, src, shifts=None, cell=None) -> float:
    """Total energy (eV)."""
    return float(np.sum(self.atomic_energies(atomic_numbers, positions, dst, src, shifts, cell),
                        dtype=np.float64))

  def energy_and_forces(self, atomic_numbers, positions, dst, src, shifts=None, cell=None):
    """``(energy, forces)`` with forces ``-dE/dR`` (eV/Å), shape (N, 3)."""
    args = self._prepare(atomic_numbers, positions, dst, src, shifts, cell)
    e, g = self._jitted["energy_forces"](self.params, *args)
    return float(e), -np.asarray(g)

  # ------------------------------------------------------------------ files
  def save(self, path) -> None:
    """Write one self-describing model file (see :mod:`potentials.io`)."""
    from .io import save
    save(self, path)
