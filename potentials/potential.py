"""``Potential``: a frozen bundle of model config, parameters, species and metadata.

It hands out the pure functions the simulator plugins differentiate (call them with keywords
across the core/adapter seam):

* ``atomic_energies_from_pairs_fn()``: ``f(params, species_index, r, dst, src, atom_mask=None,
  indices_are_sorted=False) -> (N,)`` from pair vectors (JAX-MD computes them with its own
  displacement function);
* ``atomic_energies_fn()``: the same from positions, integer image shifts and a cell
  (``r_k = R[src] - R[dst] + shifts_k @ cell``), differentiable in positions and cell.

Convenience methods (``energy``, ``atomic_energies``, ``energy_and_forces``) take NumPy arrays
and atomic numbers, evaluate through :func:`potentials.observables.compute` and jit once per
input shape. Files: :meth:`Potential.save`, :meth:`Potential.load` (:mod:`potentials.io`).
Vocabulary (species, species index): :mod:`potentials.elements`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import deprecation, elements, ensemble, io, observables
from .elements import ELEMENTS, UnknownElementError  # noqa: F401  (old home of both)
from .deprecation import renamed
from .model import EnergyModel, ModelConfig
from .ops import pair_vectors  # noqa: F401  (old home; use potentials.ops.pair_vectors)

# ``memo(key, compute) -> value``: ``compute()``, possibly remembered (see reference_params)
Memo = Callable[[str, Callable[[], Any]], Any]

PRNGLike = Union[int, jax.Array]
ArrayLike = Any
element_symbol = elements.symbol  # old name


def init_params(config: ModelConfig, num_species: int, key: jax.Array):
  """Fresh parameters of :class:`EnergyModel` (their shapes do not depend on N); a committee
  (``config.committee > 1``) gets that many, from split keys, stacked on a leading axis."""
  return _init_params(config, num_species, key)


# jitted: flax's init run eagerly dispatches (and compiles) every operation of the model on
# its own, which took 2-3x as long as compiling the whole init once
@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params(config: ModelConfig, num_species: int, key: jax.Array):
  dummy_r = jnp.array([[1.0, 0.2, 0.1], [-1.0, -0.2, -0.1]], jnp.float32)
  idx = jnp.array([0, 1], jnp.int32)
  model = EnergyModel(config, num_species)
  one = lambda k: model.init(k, jnp.zeros(2, jnp.int32), dummy_r, idx, idx[::-1])["params"]
  if config.committee == 1:
    return one(key)
  return jax.vmap(one)(jax.random.split(key, config.committee))


def _compute(key: str, compute: Callable[[], Any]) -> Any:
  return compute()


def reference_params(config: ModelConfig, num_species: int, *, memo: Optional[Memo] = None) -> dict:
  """Zeros shaped like :func:`init_params`' tree (nested dicts; the model traced abstractly),
  the template model files are checked against. ``memo(key, compute) -> compute()`` may
  remember the shapes between processes (tracing the model for them takes a good part of a
  second; :func:`plugin.exported.json_memo` keeps them in eqattn's cache); the key says
  everything the value depends on besides eqattn's source."""
  key = f"{sorted(config.to_dict().items())}|{num_species}"
  code = (memo or _compute)(key, lambda: _shape_code(_abstract_params(config, num_species)))
  return _from_shape_code(code)


def _abstract_params(config: ModelConfig, num_species: int):
  return jax.eval_shape(lambda: init_params(config, num_species, jax.random.PRNGKey(0)))


def _shape_code(tree):
  """A JSON-able description of a nested dict of arrays: ``[shape, dtype]`` leaves."""
  if isinstance(tree, Mapping):
    return {k: _shape_code(v) for k, v in tree.items()}
  return [list(tree.shape), np.dtype(tree.dtype).name]


def _from_shape_code(code):
  if isinstance(code, dict):
    return {k: _from_shape_code(v) for k, v in code.items()}
  return np.zeros(tuple(code[0]), code[1])


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
  def create(
    cls,
    key: PRNGLike = 0,
    *,
    species: Sequence[Union[int, str]],
    **hyperparameters,
  ) -> "Potential":
    """A randomly initialised potential for ``species`` (atomic numbers or symbols).

    ``hyperparameters`` are :class:`ModelConfig` fields (cutoff, features, max_degree,
    num_iterations, num_heads, num_basis, radial, cutoff_function, include_pseudotensors,
    use_fused_tensor, repulsion, repulsion_cutoff, density_features, product, ...), each
    defaulting to :class:`ModelConfig`'s.
    """
    config = ModelConfig(**hyperparameters)
    zs = elements.species_list(species)
    if isinstance(key, (int, np.integer)):
      key = jax.random.PRNGKey(int(key))
    return cls(config, zs, init_params(config, len(zs), key), {"created_with": "Potential.create"})

  def replace(self, **changes) -> "Potential":
    return dataclasses.replace(self, **changes)

  def with_ewald_accuracy(self, accuracy: float) -> "Potential":
    """This model with its Ewald sums (reciprocal vectors or PME grid) truncated at
    ``accuracy`` instead of the file's ``config.ewald_accuracy``: a numerical setting, not a
    learnt one, so energies change by about the truncation errors' difference (``eqattn md
    --ewald-accuracy``)."""
    if not self.config.electrostatics:
      raise ValueError("an Ewald accuracy is for a model with electrostatics; this one is local")
    return self.replace(config=dataclasses.replace(self.config, ewald_accuracy=float(accuracy)))

  @property
  def cutoff(self) -> float:
    return self.config.cutoff

  @property
  def receptive_field(self) -> float:
    """Distance (Å) beyond which atoms do not change an atom's energy
    (:attr:`ModelConfig.receptive_field`)."""
    return self.config.receptive_field

  @property
  def num_stages(self) -> int:
    """Hops of the model over the pair graph (:attr:`ModelConfig.num_stages`)."""
    return self.config.num_stages

  @property
  def model(self) -> EnergyModel:
    return EnergyModel(self.config, len(self.species))

  @property
  def symbols(self) -> Tuple[str, ...]:
    return tuple(elements.symbol(z) for z in self.species)

  @property
  def element_shifts(self) -> np.ndarray:
    """Per-species reference energies (eV, float64): an isolated atom's energy (a
    committee's mean over its members)."""
    shift = np.asarray(self.params["shift"], np.float64)
    return shift.mean(axis=0) if self.config.committee > 1 else shift

  # ------------------------------------------------------------------ ensembles
  @property
  def num_members(self) -> int:
    """Ensemble members (``committee * heads``; 1 for a single model)."""
    return self.config.committee * self.config.readout_heads

  @property
  def uncertainty_scales(self) -> Tuple[float, float]:
    """``(energy_scale, forces_scale)``: calibration of the members' spread
    (:mod:`potentials.ensemble`; 1.0 before calibration)."""
    return ensemble.scales(self.metadata)

  @classmethod
  def stack(cls, potentials: Sequence["Potential"], metadata=None) -> "Potential":
    """A committee of single potentials of one architecture and species list (e.g. files
    trained from different seeds); its energy is their mean."""
    first = potentials[0]
    if any(p.config.force_heads for p in potentials):
      raise ValueError(
        "a committee differentiates its members' forces; stack shallow ensembles without "
        "their force readout: Potential.stack([potentials.training.without_readout(p) ...])"
      )
    for p in potentials:
      if p.config != first.config or p.species != first.species or p.config.committee != 1:
        raise ValueError(
          "a committee needs single models (committee = 1) of one architecture and species "
          f"list; got {p.config} for {p.symbols} beside {first.config} for {first.symbols}"
        )
    config = dataclasses.replace(first.config, committee=len(potentials))
    params = ensemble.stack([p.params for p in potentials])
    return cls(config, first.species, params, dict(metadata or first.metadata))

  def members(self) -> Tuple["Potential", ...]:
    """A committee's members as single potentials (``(self,)`` for one parameter set)."""
    if self.config.committee == 1:
      return (self,)
    config = dataclasses.replace(self.config, committee=1)
    return tuple(
      Potential(config, self.species, p, dict(self.metadata))
      for p in ensemble.unstack(self.params, self.config.committee)
    )

  # ------------------------------------------------------------------ species
  @functools.cached_property
  def _species_table(self) -> np.ndarray:
    return elements.species_table(self.species)

  def species_index(self, atomic_numbers: ArrayLike) -> np.ndarray:
    """Map atomic numbers to the model's species indices; unknown elements raise
    :class:`UnknownElementError`."""
    return elements.species_indices(self._species_table, atomic_numbers, self.species)

  # ------------------------------------------------------------------ pure functions
  def atomic_energies_from_pairs_fn(self, include_shift: bool = True) -> Callable:
    """``f(params, species_index, r, dst, src, atom_mask=None, indices_are_sorted=False)
    -> (N,)`` per-atom energies (eV) from pair vectors; ``species_index`` per atom
    (``species=`` is its deprecated name). An ensemble gives its members' mean.

    With ``include_shift=False`` the per-element reference energies are left out; add
    ``self.element_shifts[species_index]`` in float64 on the host (float32 runs keep their
    precision).
    """
    self._refuse_electrostatics("atomic_energies_from_pairs_fn")
    if self.num_members == 1:
      return self._apply_fn(include_shift)
    members = self.member_energies_fn(include_shift)
    return renamed(species="species_index")(lambda *a, **k: jnp.mean(members(*a, **k), -1))

  def energies_and_charges_from_pairs_fn(self, include_shift: bool = True) -> Callable:
    """For a model with ``electrostatics``: ``f(params, species_index, r, dst, src,
    atom_mask=None, indices_are_sorted=False) -> (energies (N,), (raw charges (N,), weights
    (N,)))``, the local per-atom energies, the charges before neutralisation and the atoms'
    weights in it (:meth:`EnergyModel.energies_and_charges`); the electrostatic energy
    is the ``long_range`` term of :func:`potentials.observables.compute`
    (:func:`potentials.electrostatics.model_long_range_fn`)."""
    if not self.config.electrostatics:
      raise ValueError("energies_and_charges_from_pairs_fn needs a model with electrostatics")
    return renamed(species="species_index")(self._apply_fn(include_shift, charges=True))

  def _refuse_electrostatics(self, what: str) -> None:
    """A model with electrostatics never runs as its local part alone, silently."""
    if self.config.electrostatics:  # a ValueError: the command line's exit 2
      raise ValueError(
        f"this model has learnt charges and long-range electrostatics, which {what} leaves "
        "out (it gives the local energy only); evaluate it with plugin.ase.Calculator, "
        "plugin.jax_md.neighbor_list or plugin.md.run (eqattn md), or train it with "
        "potentials.training, which include them"
      )

  def pair_energies_fn(self, include_shift: bool = True) -> Callable:
    """Deprecated name of :meth:`atomic_energies_from_pairs_fn` (it gives per-atom energies)."""
    deprecation.warn("Potential.pair_energies_fn", "Potential.atomic_energies_from_pairs_fn")
    return self.atomic_energies_from_pairs_fn(include_shift)

  def member_energies_fn(self, include_shift: bool = True) -> Callable:
    """Like :meth:`atomic_energies_from_pairs_fn`, but ``-> (N, members)``: every ensemble member's
    per-atom energies (committee-major; ``(N, 1)`` for a single model). Without shifts, a
    committee member's own shifts minus the mean ones (:attr:`element_shifts`) stay in, so
    the members differ by exactly what they would with shifts. A committee also takes ``r``
    of shape ``(committee, pairs, 3)``, one copy per network (what
    ``potentials.observables.compute(members=committee)`` passes to get forces per member)."""
    self._refuse_electrostatics("member_energies_fn")
    apply = self._apply_fn(include_shift)
    cfg = self.config

    @renamed(species="species_index")
    def f(params, species_index, r, dst, src, atom_mask=None, indices_are_sorted=False):
      if cfg.committee > 1:  # of the params given, which may not be self.params
        mean_shift = jnp.mean(jnp.asarray(params["shift"], r.dtype), axis=0)

      def one(p, r):
        e = apply(p, species_index, r, dst, src, atom_mask, indices_are_sorted)
        if include_shift or cfg.committee == 1:
          return e
        d = (jnp.asarray(p["shift"], e.dtype) - mean_shift.astype(e.dtype))[species_index]
        if atom_mask is not None:
          d = jnp.where(atom_mask, d, 0.0)
        return e + (d if cfg.readout_heads == 1 else d[:, None])

      if cfg.committee == 1:
        e = one(params, r)
      else:  # pair vectors (pairs, 3) shared, or (K, pairs, 3) one copy per network
        e = jax.vmap(one, (0, 0 if r.ndim == 3 else None))(params, r)
      e = ensemble.member_axis(e, cfg.committee, cfg.readout_heads)
      return e if e.ndim == 2 else e[:, None]

    return f

  def member_forces_fn(self, include_shift: bool = True) -> Callable:
    """For a shallow ensemble with ``force_heads``: ``f(params, species_index, r, dst, src,
    atom_mask=None, indices_are_sorted=False) -> (energies (N, members), deviations (N,
    members, 3))``, every member's per-atom energies and its force deviation from the mean
    force (eV/Å; zero mean over members), from one forward pass."""
    if not self.config.force_heads:
      raise ValueError(
        "member_forces_fn needs a shallow ensemble with force_heads=True; other ensembles "
        "get member forces by differentiating member_energies_fn"
      )
    apply = self._apply_fn(include_shift, member_forces=True)
    return renamed(species="species_index")(apply)

  def stage_fn(self, stage: int) -> Callable:
    """One hop of the model, for domain decompositions that exchange features between hops
    (``EnergyModel``'s ``stage``): ``f(params, species_index, r, dst, src, *,
    features=None, atom_mask=None, indices_are_sorted=False)``. Stages before the last return
    features (a committee's with a leading member axis, which ``features`` then also has); the
    last returns the per-atom energies without element shifts (an ensemble's mean, ``(N,)``).
    Chaining ``stage_fn(0) ... stage_fn(num_stages - 1)`` equals
    ``atomic_energies_from_pairs_fn(False)``.
    """
    self._refuse_electrostatics("stage_fn (domain decomposition, LAMMPS)")
    cfg = self.config
    last = stage == cfg.num_stages - 1
    apply = self._apply_fn(False, stage=stage)

    def f(
      params,
      species_index,
      r,
      dst,
      src,
      *,
      features=None,
      atom_mask=None,
      indices_are_sorted=False,
    ):
      run = lambda p, x: apply(p, species_index, r, dst, src, atom_mask, indices_are_sorted, x)
      if cfg.committee == 1:
        out = run(params, features)
      else:
        out = jax.vmap(run, (0, None if features is None else 0))(params, features)
      if not last:
        return out
      # members: readout heads, then networks
      out = out if cfg.readout_heads == 1 else jnp.mean(out, axis=-1)
      return out if cfg.committee == 1 else jnp.mean(out, axis=0)

    return f

  def _apply_fn(
    self,
    include_shift: bool,
    member_forces: bool = False,
    stage: int | None = None,
    charges: bool = False,
  ) -> Callable:
    """One parameter set's ``(params, species_index, r, dst, src, atom_mask,
    indices_are_sorted) -> (N,)`` (``(N, heads)`` with several heads); with ``stage``, that
    stage only, taking ``features`` as a last argument (:meth:`stage_fn`)."""
    model = self.model
    zs = jnp.asarray(self.species)
    if stage is not None:  # one hop
      method = lambda m, *args, features=None: m.stage(stage, *args, features=features)
    elif member_forces:
      method = EnergyModel.with_member_forces
    elif charges:
      method = EnergyModel.energies_and_charges
    else:
      method = EnergyModel.energies

    def apply(
      params, species_index, r, dst, src, atom_mask=None, indices_are_sorted=False, features=None
    ):
      if stage is None and features is not None:
        raise ValueError("features are the input of stages after the first, and only of those")
      args = (species_index, r, dst, src, atom_mask, zs, indices_are_sorted, include_shift)
      kw = {} if stage is None else {"features": features}
      return model.apply({"params": params}, *args, method=method, **kw)

    return renamed(species="species_index")(apply)

  def atomic_energies_fn(self, include_shift: bool = True) -> Callable:
    """``f(params, species_index, positions, dst, src, shifts=None, cell=None,
    atom_mask=None, indices_are_sorted=False) -> (N,)`` per-atom energies (eV)."""
    pair_fn = self.atomic_energies_from_pairs_fn(include_shift)

    @renamed(species="species_index")
    def f(
      params,
      species_index,
      positions,
      dst,
      src,
      shifts=None,
      cell=None,
      atom_mask=None,
      indices_are_sorted=False,
    ):
      r = pair_vectors(positions, dst, src, shifts, cell)
      return pair_fn(
        params,
        species_index=species_index,
        r=r,
        dst=dst,
        src=src,
        atom_mask=atom_mask,
        indices_are_sorted=indices_are_sorted,
      )

    return f

  def energy_fn(self) -> Callable:
    """Like :meth:`atomic_energies_fn` but returns the total energy (a scalar)."""
    f = self.atomic_energies_fn()
    return lambda *a, **k: jnp.sum(f(*a, **k))

  # ------------------------------------------------------------------ convenience
  @functools.cached_property
  def _evaluate(self) -> Callable:
    """Jitted ``(params, species_index, positions, dst, src, shifts, cell, forces=)`` ->
    :class:`potentials.observables.Observables` (no strain)."""
    pair_fn = self.atomic_energies_from_pairs_fn()

    def evaluate(params, species_index, positions, dst, src, shifts, cell, forces):
      energies = lambda r: pair_fn(params, species_index=species_index, r=r, dst=dst, src=src)
      return observables.compute(
        energies, positions, dst=dst, src=src, shifts=shifts, cell=cell, forces=forces, strain=False
      )

    return jax.jit(evaluate, static_argnames=("forces",))

  def _inputs(self, atomic_numbers, positions, dst, src, shifts, cell) -> tuple:
    """Checked device arrays ``(species_index, positions, dst, src, shifts, cell)``."""
    species = self.species_index(atomic_numbers)
    pos = np.asarray(positions)
    if pos.shape != (len(species), 3):
      raise ValueError(f"positions must have shape ({len(species)}, 3), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
      bad = int(np.argwhere(~np.isfinite(pos).all(axis=1))[0, 0])
      raise ValueError(f"positions of atom {bad} are not finite: {pos[bad]}")
    # float64 input without x64 runs in float32 (JAX's own rule, minus its warning)
    dtype = jax.dtypes.canonicalize_dtype(
      pos.dtype if pos.dtype in (np.float32, np.float64) else np.float64
    )
    if shifts is None:
      shifts, cell = np.zeros((len(dst), 3)), np.zeros((3, 3))
    elif cell is None:
      raise ValueError("shifts given without a cell")
    return (
      jnp.asarray(species),
      jnp.asarray(pos, dtype),
      jnp.asarray(dst, jnp.int32),
      jnp.asarray(src, jnp.int32),
      jnp.asarray(shifts, dtype),
      jnp.asarray(cell, dtype),
    )

  def atomic_energies(self, atomic_numbers, positions, dst, src, shifts=None, cell=None):
    """Per-atom energies (eV) as a NumPy array for one structure and its pair list."""
    args = self._inputs(atomic_numbers, positions, dst, src, shifts, cell)
    return np.asarray(self._evaluate(self.params, *args, forces=False).energies)

  def energy(self, atomic_numbers, positions, dst, src, shifts=None, cell=None) -> float:
    """Total energy (eV)."""
    return float(
      np.sum(
        self.atomic_energies(atomic_numbers, positions, dst, src, shifts, cell), dtype=np.float64
      )
    )

  def energy_and_forces(self, atomic_numbers, positions, dst, src, shifts=None, cell=None):
    """``(energy, forces)`` with forces ``-dE/dR`` (eV/Å), shape (N, 3)."""
    args = self._inputs(atomic_numbers, positions, dst, src, shifts, cell)
    out = self._evaluate(self.params, *args, forces=True)
    return float(out.energy), np.asarray(out.forces)

  # ------------------------------------------------------------------ files
  def save(self, path) -> None:
    """Write one self-describing model file (see :mod:`potentials.io`), atomically."""
    io.write_model(
      path,
      config=self.config.to_dict(),
      species=self.species,
      cutoff=self.cutoff,
      metadata=self.metadata,
      params=self.params,
    )

  @classmethod
  def load(cls, name_or_path, *, memo: Optional[Memo] = None) -> "Potential":
    """A model file, or a shipped model by name (e.g. ``Potential.load("ethanol")``);
    ``memo``: see :func:`reference_params`."""
    path = io.resolve(name_or_path)
    content = io.read_model(path)
    try:
      config = ModelConfig.from_dict(dict(content["config"]))
      species = elements.species_list([int(z) for z in content["species"]])
    except (TypeError, ValueError) as e:
      raise io.ModelFileError(f"{path}: bad model config or species: {e}") from None
    if abs(float(content["cutoff"]) - config.cutoff) > 0:
      raise io.ModelFileError(f"{path}: cutoff {content['cutoff']} disagrees with config")
    reference = reference_params(config, len(species), memo=memo)
    params = io.check_params(content["params"], reference, path)
    params = jax.tree_util.tree_map(np.asarray, params)
    return cls(config, species, params, dict(content["metadata"]))


def load(name_or_path, *, memo: Optional[Memo] = None) -> Potential:
  """Load a model file, or a shipped model by name (e.g. ``load("ethanol")``)."""
  return Potential.load(name_or_path, memo=memo)


def save(potential: Potential, path) -> None:
  """Write ``potential`` to ``path`` atomically (``potential.save(path)``)."""
  potential.save(path)
