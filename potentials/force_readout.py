"""Member force deviations read out directly: a shallow ensemble's force uncertainty without a
backward pass per member.

A member's force is ``-dE_m/dR``; its deviation from the mean force needs one backward pass
per member (2-3x the cost of one E+F call for 4 heads). With ``ModelConfig.force_heads``,
every head also reads out its member's force deviation from the shared network's final
scalar features, as a sum of pair vectors,

``d_im = sum_j w_m(x_i, x_j, r_ij) cut(r_ij) r_ij / |r_ij|  -  mean over members``,

which is equivariant (rotates and reflects with the positions), smooth at the cutoff and zero
in the members' mean, so the mean force stays ``-dE/dR``. The readout sees the features
through ``stop_gradient``, so it never changes the energy model; it is fitted to imitate the
members' differentiated deviations (:mod:`potentials.training.readout_fit`), and costs one
pass over the pairs in the forward pass that the energy needs anyway.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .so3 import safe_norm


class ForceReadout(nn.Module):
  """``(x (N, F), rbf (pairs, K), cut (pairs,), r (pairs, 3)) -> (N, heads, 3)``: per atom,
  every member's force deviation (eV/Å; zero mean over ``heads``).

  ``cut`` must be zero on padded pairs (``dst``/``src`` equal to ``N``); ``x`` are the final
  per-atom scalar features (the caller stops their gradient).

  Attributes:
    heads: ensemble members (deviations per atom).
    features: channels of the per-pair weights (16: the readout then adds ~2 % to an E+F
      call of the default architecture; 48 added 16 %).
  """

  heads: int
  features: int = 16

  @nn.compact
  def __call__(self, x, rbf, cut, r, *, dst_idx, src_idx, num_segments, indices_are_sorted):
    centre = nn.Dense(self.features, name="centre")(x)
    neighbour = nn.Dense(self.features, use_bias=False, name="neighbour")(x)
    radial = nn.Dense(self.features, use_bias=False, name="radial")(rbf)
    take = lambda a, i: jnp.take(a, i, axis=0, mode="fill", fill_value=0)
    h = nn.silu(take(centre, dst_idx) * take(neighbour, src_idx) * radial)
    # small random start: an unfitted readout claims almost no spread, and zero weights
    # would leave every head's deviation identical
    small = nn.initializers.variance_scaling(1e-4, "fan_in", "normal")
    w = nn.Dense(self.heads, use_bias=False, kernel_init=small, name="out")(h) * cut[:, None]
    norm = safe_norm(r, keepdims=True)
    unit = r / jnp.where(norm > 0, norm, 1.0)
    d = jax.ops.segment_sum(
      w[:, :, None] * unit[:, None, :],
      dst_idx,
      num_segments=num_segments,
      indices_are_sorted=indices_are_sorted,
    )
    return d - jnp.mean(d, axis=1, keepdims=True)
