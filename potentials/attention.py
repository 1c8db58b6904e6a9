"""Equivariant multi-head self-attention over pairs (``potentials.SelfAttention``).

Constructor arguments, defaults and the call signature are those of
``e3x.nn.modules.SelfAttention``, so the layer is a drop-in replacement; the implementation is
our own and differs where the usual one fails:

* the softmax is stabilised with the per-centre maximum of ``logit + log(cutoff_value)``, i.e.
  only over pairs that carry weight, so a zero-weight pair with a huge logit cannot push the
  real pairs into underflow;
* a centre with no (weighted) pairs gets an exact zero message, and its gradient is zero, not
  NaN;
* padded pairs (index ``N``) and masked pairs are inert in values and gradients;
* normalisation divides once per centre after the sum over pairs, not once per pair.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import (
  Dense,
  Dtype,
  InitializerFn,
  _output_parity,
  blocks_layout,
  change_max_degree_or_type,
  default_kernel_init,
  make_tensor,
  map_blocks,
  max_degree_of,
  merge_blocks,
  split_blocks,
)
from .ops import flatten_batch, normalize_pairs, segment_softmax

__all__ = ["SelfAttention", "segment_softmax"]  # segment_softmax lives in potentials.ops


class SelfAttention(nn.Module):
  """Equivariant multi-head self-attention.

  Each centre ``i`` (receiver, ``dst_idx``) attends over its pairs ``k = (i, j)`` with one
  softmax per head:

  ``w_k = c_k exp(a_k) / sum_{k' in i} c_k' exp(a_k')`` with
  ``a_k = <q_i, k_j>_rpe / sqrt(depth)`` and ``c_k = cutoff_value``,

  where the dot product runs over parity, degree and the head's features, modulated per
  (parity, degree, feature) by a learned linear function of the l=0 basis component when
  ``use_relative_positional_encoding_qk``. Messages are the neighbour's values ``v_j``, coupled
  with a learned filter of the basis through a tensor product when
  ``use_relative_positional_encoding_v``; ``out_i = Dense(sum_k w_k message_k)``.

  Shapes: ``inputs (..., N, P, (L+1)**2, F)``; sparse pairs ``basis (..., pairs, 1, Q_b, K)``,
  ``cutoff_value (..., pairs)`` (trailing size-1 axes allowed), ``dst_idx/src_idx (..., pairs)``
  with padding index ``N``; or dense pairs ``basis (..., N, M, 1, Q_b, K)``,
  ``adj_idx (..., N, M)`` and ``where (..., N, M)``. Returns
  ``(..., N, 1 or 2, (max_degree+1)**2, out_features)``.
  """

  max_degree: Optional[int] = None
  use_basis_bias: bool = False
  include_pseudotensors: bool = True
  cartesian_order: bool = True
  use_fused_tensor: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  dense_kernel_init: InitializerFn = default_kernel_init
  dense_bias_init: InitializerFn = nn.initializers.zeros
  tensor_kernel_init: Optional[InitializerFn] = None
  num_heads: Optional[int] = 1
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  use_relative_positional_encoding_qk: bool = True
  use_relative_positional_encoding_v: bool = True
  query_kernel_init: InitializerFn = default_kernel_init
  query_bias_init: InitializerFn = nn.initializers.zeros
  query_use_bias: bool = False
  key_kernel_init: InitializerFn = default_kernel_init
  key_bias_init: InitializerFn = nn.initializers.zeros
  key_use_bias: bool = False
  value_kernel_init: InitializerFn = default_kernel_init
  value_bias_init: InitializerFn = nn.initializers.zeros
  value_use_bias: bool = False
  output_kernel_init: InitializerFn = default_kernel_init
  output_bias_init: InitializerFn = nn.initializers.zeros
  output_use_bias: bool = True

  @nn.compact
  def __call__(
    self,
    inputs: jax.Array,
    basis: Optional[jax.Array] = None,
    cutoff_value: Optional[jax.Array] = None,
    *,
    adj_idx: Optional[jax.Array] = None,
    where: Optional[jax.Array] = None,
    dst_idx: Optional[jax.Array] = None,
    src_idx: Optional[jax.Array] = None,
    num_segments: Optional[int] = None,
    indices_are_sorted: bool = False,
  ) -> jax.Array:
    use_rpe = self.use_relative_positional_encoding_qk or self.use_relative_positional_encoding_v
    if use_rpe and basis is None:
      raise TypeError("relative positional encodings need 'basis', received basis=None")
    L_in = max_degree_of(inputs.shape)
    N = inputs.shape[-4]
    batch_shape = inputs.shape[:-4]
    nb = len(batch_shape)

    # ---- normalise the pair format to flat sparse lists over (batch * N) centres
    pairs = normalize_pairs(
      N,
      batch_shape,
      basis=basis,
      cutoff_value=cutoff_value,
      adj_idx=adj_idx,
      where=where,
      dst_idx=dst_idx,
      src_idx=src_idx,
      num_segments=num_segments,
      indices_are_sorted=indices_are_sorted,
    )
    dst, src, valid, basis, cut, sorted_ = pairs
    # split once: both uses below then send their gradients to one concatenate
    basis_blocks = None if basis is None else split_blocks(basis)
    x = flatten_batch(inputs, nb, 3)
    n_tot = x.shape[0]

    # ---- projections (per atom), then per-pair work on blocks {(p, l): (pairs, 2l+1, F)}
    heads = self.num_heads or 1
    qkv = x.shape[-1] if self.qkv_features is None else self.qkv_features
    out_features = x.shape[-1] if self.out_features is None else self.out_features
    if qkv % heads:
      raise ValueError(f"qkv_features ({qkv}) must be divisible by num_heads ({heads})")
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    xb = split_blocks(x)
    q, k, v = (
      Dense(
        qkv,
        use_bias=getattr(self, f"{name}_use_bias"),
        kernel_init=getattr(self, f"{name}_kernel_init"),
        bias_init=getattr(self, f"{name}_bias_init"),
        name=name,
        **dense,
      )(xb)
      for name in ("query", "key", "value")
    )
    P = x.shape[-3]
    dt = q[(0, 0)][0].dtype

    # ---- logits per pair and head
    if self.use_relative_positional_encoding_qk:
      rpe = nn.Dense(
        P * (L_in + 1) * qkv,
        use_bias=self.use_basis_bias,
        kernel_init=self.dense_kernel_init,
        bias_init=self.dense_bias_init,
        name="relative_positional_encoding",
        **dense,
      )(basis_blocks[(0, 0)][0])
      rpe = rpe.reshape(rpe.shape[0], P, L_in + 1, qkv).astype(dt)
    else:
      rpe = None
    logits = _logits(q, k, rpe, dst, src, heads=heads, depth=P * (L_in + 1) ** 2 * (qkv // heads))

    # ---- softmax over each centre's pairs, weighted by the cutoff before normalising
    u, inv = segment_softmax(logits, cut, valid, dst, n_tot, indices_are_sorted=sorted_)

    # ---- weighted messages, summed per centre, normalised once per centre
    u_f, inv_f = (jnp.repeat(a, qkv // heads, axis=-1) for a in (u, inv))
    agg = self._aggregate(v, u_f, inv_f, (dst, src, n_tot, sorted_), basis_blocks, P, L_in, dense)
    out = Dense(
      out_features,
      use_bias=self.output_use_bias,
      kernel_init=self.output_kernel_init,
      bias_init=self.output_bias_init,
      name="out",
      **dense,
    )(agg)
    return out.reshape(batch_shape + (N,) + out.shape[-3:]) if nb else out

  def _aggregate(self, v, u_f, inv_f, pairs, basis_blocks, P: int, L_in: int, dense: dict):
    """``(n_tot, P', (L'+1)**2, qkv)``: the values ``v`` (blocks) of each pair's source times
    its attention weight ``u_f`` (per feature), filtered by the basis where configured, summed
    per centre and normalised by ``inv_f``; ``pairs = (dst, src, n_tot, sorted)``."""
    dst, src, n_tot, sorted_ = pairs
    qkv = u_f.shape[-1]
    msg = map_blocks(lambda c: _take(c, src) * u_f, v)
    L_out, P_out = self.max_degree, P
    if self.use_relative_positional_encoding_v:
      msg, L_out, P_out = self._filter_messages(msg, basis_blocks, P, L_in, qkv, dense)
    L_msg = L_in if not self.use_relative_positional_encoding_v else L_out
    agg = map_blocks(
      lambda c: jax.ops.segment_sum(c, dst, num_segments=n_tot, indices_are_sorted=sorted_), msg
    )
    if not agg:
      agg = {(0, 0): (jnp.zeros((n_tot, qkv), u_f.dtype),)}
    agg = merge_blocks(agg, P_out, L_msg) * inv_f[:, None, None, :]
    return agg if L_out is None else change_max_degree_or_type(agg, L_out)

  def _filter_messages(self, msg, basis, P: int, L_in: int, qkv: int, dense: dict):
    """Value messages ``{(p, l): (pairs, 2l+1, F)}`` times a learned radial filter of the
    basis blocks ``basis`` (:func:`split_blocks`) through a tensor product: returns them,
    their max degree and parity count."""
    L_b = blocks_layout(basis)[1]
    L_out = max(L_in, L_b) if self.max_degree is None else self.max_degree
    filt = Dense(
      qkv,
      use_bias=self.use_basis_bias,
      kernel_init=self.dense_kernel_init,
      bias_init=self.dense_bias_init,
      name="filter",
      **dense,
    )(basis)
    tkw = {} if self.tensor_kernel_init is None else {"kernel_init": self.tensor_kernel_init}
    tensor = make_tensor(
      self.use_fused_tensor,
      max_degree=L_out,
      include_pseudotensors=self.include_pseudotensors,
      cartesian_order=self.cartesian_order,
      name="tensor",
      **dense,
      **tkw,
    )
    P_out = _output_parity(1, L_b, P, L_in, L_out, self.include_pseudotensors)
    return tensor(filt, msg), L_out, P_out


def _take(t: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows ``idx`` of ``t``. Padding indices are clipped to a real row (much faster than a
  filling gather on CPU); those pairs are inactive: the softmax masks their logits and
  messages."""
  return jnp.take(t, idx, axis=0, mode="clip")


def _logits(q, k, rpe, dst, src, *, heads: int, depth: int) -> jax.Array:
  """Scaled dot products ``(pairs, heads)`` of query blocks at ``dst`` with key blocks at
  ``src`` (blocks ``{(p, l): (2l+1) x (N, F)}``), each ``(p, l)`` term scaled by the relative
  positional encoding ``rpe`` ``(pairs, P, L+1, F)`` when given; ``depth`` is the number of
  products summed per head."""
  dots = 0
  for (p, l), qb in q.items():
    d = sum(_take(qc, dst) * _take(kc, src) for qc, kc in zip(qb, k[(p, l)]))  # (pairs, F)
    dots = dots + (d if rpe is None else d * rpe[:, p, l, :])
  logits = dots.reshape(dots.shape[0], heads, dots.shape[-1] // heads).sum(-1)
  return logits / jnp.sqrt(jnp.asarray(depth, logits.dtype))
