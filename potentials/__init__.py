"""eqattn core: E(3)-equivariant layers and the self-attention energy model (pure JAX + flax).

This package imports neither ASE nor JAX-MD; the simulator adapters live in ``plugin``.
Conventions (array layout, pairs, padding, units, stress signs, files): ``docs/conventions.md``.
"""

from . import elements, ensemble, io, observables, ops, so3
from .attention import SelfAttention
from .layers import (
  Dense,
  Embed,
  FusedTensor,
  Gate,
  Tensor,
  change_max_degree_or_type,
  max_degree_of,
)
from .radial import basis, bessel, cosine_cutoff, gaussian, reciprocal_bernstein, smooth_cutoff
from .so3 import clebsch_gordan, solid_harmonics, spherical_harmonics, wigner_d
from .model import EnergyModel, ModelConfig
from .elements import UnknownElementError
from .io import CheckpointError, ModelFileError, shipped_models
from .ops import pair_vectors, segment_softmax
from .potential import Potential, load, save

io.DEPRECATED.update(load=load, save=save)  # potentials.io.load/save, deprecated

__all__ = [
  "SelfAttention",
  "Dense",
  "Embed",
  "FusedTensor",
  "Gate",
  "Tensor",
  "change_max_degree_or_type",
  "max_degree_of",
  "basis",
  "bessel",
  "cosine_cutoff",
  "gaussian",
  "reciprocal_bernstein",
  "smooth_cutoff",
  "clebsch_gordan",
  "solid_harmonics",
  "spherical_harmonics",
  "wigner_d",
  "so3",
  "EnergyModel",
  "ModelConfig",
  "Potential",
  "UnknownElementError",
  "pair_vectors",
  "segment_softmax",
  "ModelFileError",
  "CheckpointError",
  "load",
  "save",
  "shipped_models",
  "elements",
  "ensemble",
  "io",
  "observables",
  "ops",
]
