import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import potentials as pt
from potentials import so3
from potentials.attention import segment_softmax
from test_layers import transform

RC = 3.5
F = 8


def pair_basis(pos, dst, src, L=2, dtype=jnp.float64, cartesian_order=True):
  r = jnp.asarray(pos[src] - pos[dst], dtype)
  return pt.basis(
    r,
    max_degree=L,
    num=6,
    radial_fn=pt.reciprocal_bernstein,
    cutoff_fn=functools.partial(pt.smooth_cutoff, cutoff=RC),
    return_cutoff=True,
    cartesian_order=cartesian_order,
  )


def make(pos, dst, src, x, module, params=None, sorted_=True):
  b, c = pair_basis(pos, dst, src, dtype=x.dtype, cartesian_order=module.cartesian_order)
  kw = dict(
    dst_idx=jnp.asarray(dst),
    src_idx=jnp.asarray(src),
    num_segments=len(x),
    indices_are_sorted=sorted_,
  )
  if params is None:
    params = module.init(jax.random.PRNGKey(0), x, b, c, **kw)
  return params, jitted(module, len(x), sorted_)(params, x, b, c, kw["dst_idx"], kw["src_idx"])


@functools.lru_cache(maxsize=None)
def jitted(module, n, sorted_=False):
  """Jitted apply (eager op-by-op dispatch is slow); cached per module configuration."""
  return jax.jit(
    lambda p, x, b, c, d, s: module.apply(
      p, x, b, c, dst_idx=d, src_idx=s, num_segments=n, indices_are_sorted=sorted_
    )
  )


def attn(**kw):
  kw.setdefault("param_dtype", jnp.float64)
  return pt.SelfAttention(max_degree=2, num_heads=2, **kw)


@pytest.fixture(scope="module")
def feats(cluster):
  pos, _, _ = cluster
  return jnp.asarray(np.random.default_rng(0).normal(size=(len(pos), 2, 9, F)))


def test_constructor_and_call_signature_match_e3x():
  names = [f.name for f in dataclasses.fields(pt.SelfAttention) if f.name not in ("parent", "name")]
  assert names == [
    "max_degree",
    "use_basis_bias",
    "include_pseudotensors",
    "cartesian_order",
    "use_fused_tensor",
    "dtype",
    "param_dtype",
    "precision",
    "dense_kernel_init",
    "dense_bias_init",
    "tensor_kernel_init",
    "num_heads",
    "qkv_features",
    "out_features",
    "use_relative_positional_encoding_qk",
    "use_relative_positional_encoding_v",
    "query_kernel_init",
    "query_bias_init",
    "query_use_bias",
    "key_kernel_init",
    "key_bias_init",
    "key_use_bias",
    "value_kernel_init",
    "value_bias_init",
    "value_use_bias",
    "output_kernel_init",
    "output_bias_init",
    "output_use_bias",
  ]
  m = pt.SelfAttention()
  assert (
    m.max_degree,
    m.use_basis_bias,
    m.include_pseudotensors,
    m.cartesian_order,
    m.use_fused_tensor,
    m.num_heads,
    m.qkv_features,
    m.out_features,
    m.use_relative_positional_encoding_qk,
    m.use_relative_positional_encoding_v,
    m.query_use_bias,
    m.key_use_bias,
    m.value_use_bias,
    m.output_use_bias,
  ) == (None, False, True, True, False, 1, None, None, True, True, False, False, False, True)
  sig = inspect.signature(pt.SelfAttention.__call__)
  assert list(sig.parameters) == [
    "self",
    "inputs",
    "basis",
    "cutoff_value",
    "adj_idx",
    "where",
    "dst_idx",
    "src_idx",
    "num_segments",
    "indices_are_sorted",
  ]
  assert all(
    sig.parameters[k].kind == inspect.Parameter.KEYWORD_ONLY
    for k in ["adj_idx", "where", "dst_idx", "src_idx", "num_segments", "indices_are_sorted"]
  )


@pytest.mark.parametrize(
  "kw",
  [
    {},
    {"use_fused_tensor": True},
    {"include_pseudotensors": False},
    {"cartesian_order": False},
    {"use_basis_bias": True, "out_features": 5},
  ],
)
def test_equivariance_float64(cluster, feats, kw):
  pos, dst, src = cluster
  module = attn(**kw)
  co = kw.get("cartesian_order", True)
  params, y = make(pos, dst, src, feats, module)
  assert y.shape == (
    len(pos),
    1 if kw.get("include_pseudotensors") is False else 2,
    9,
    kw.get("out_features", F),
  )
  scale = float(jnp.abs(y).max())
  assert scale > 1e-3
  for seed, reflect in [(0, False), (1, True), (2, True)]:
    rot = so3.random_rotation(seed, reflect=reflect)
    _, y_rot = make(pos @ rot.T + 1.7, dst, src, transform(feats, rot, co), module, params)
    err = float(jnp.abs(y_rot - transform(y, rot, co)).max())
    assert err <= 1e-10 * scale, err


def test_equivariance_float32(cluster, feats):
  pos, dst, src = cluster
  module = attn(param_dtype=jnp.float32)
  x = feats.astype(jnp.float32)
  params, y = make(pos, dst, src, x, module)
  assert y.dtype == jnp.float32
  rot = so3.random_rotation(5, reflect=True)
  _, y_rot = make(pos @ rot.T, dst, src, transform(x, rot).astype(jnp.float32), module, params)
  rel = float(jnp.abs(y_rot - transform(y, rot)).max() / jnp.abs(y).max())
  assert rel <= 1e-5, rel


def test_translation_and_permutation(cluster, feats):
  pos, dst, src = cluster
  module = attn()
  params, y = make(pos, dst, src, feats, module)
  _, y_t = make(pos + np.array([10.0, -3.0, 0.5]), dst, src, feats, module, params)
  np.testing.assert_allclose(y_t, y, atol=1e-12)
  rng = np.random.default_rng(1)
  perm = rng.permutation(len(pos))  # new atom a is old atom perm[a]
  inv = np.argsort(perm)
  order = rng.permutation(len(dst))  # shuffled pair order, not sorted by dst
  _, y_p = make(
    pos[perm], inv[dst][order], inv[src][order], feats[perm], module, params, sorted_=False
  )
  np.testing.assert_allclose(y_p, y[perm], atol=1e-12)


def test_sparse_equals_dense(cluster, feats):
  pos, dst, src = cluster
  module = attn()
  params, y = make(pos, dst, src, feats, module)
  n = len(pos)
  M = np.bincount(dst, minlength=n).max() + 1
  adj = np.full((n, M), n)
  for i in range(n):
    nb = src[dst == i]
    adj[i, : len(nb)] = nb
  where = adj < n
  d_dst = np.repeat(np.arange(n), M)
  b, c = pair_basis(pos, d_dst, np.where(adj.ravel() < n, adj.ravel(), 0))
  b = b.reshape(n, M, *b.shape[1:])
  c = c.reshape(n, M)
  y_dense = module.apply(params, feats, b, c, adj_idx=jnp.asarray(adj), where=jnp.asarray(where))
  np.testing.assert_allclose(y_dense, y, atol=1e-12)
  y_auto = module.apply(params, feats, b, c, adj_idx=jnp.asarray(adj))  # where from adj < N
  np.testing.assert_allclose(y_auto, y, atol=1e-12)


def loss_and_grads(module, params, x, b, c, dst, src):
  return _loss_grad(module, len(x))(params, x, b, c, jnp.asarray(dst), jnp.asarray(src))


@functools.lru_cache(maxsize=None)
def _loss_grad(module, n):
  def loss(params, x, b, c, dst, src):
    y = module.apply(params, x, b, c, dst_idx=dst, src_idx=src, num_segments=n)
    return jnp.sum(jnp.sin(y))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def test_padding_is_inert(cluster, feats):
  pos, dst, src = cluster
  module = attn()
  n = len(pos)
  b, c = pair_basis(pos, dst, src)
  params = module.init(jax.random.PRNGKey(0), feats, b, c, dst_idx=dst, src_idx=src, num_segments=n)
  v0, (gp0, gx0, gb0) = loss_and_grads(module, params, feats, b, c, dst, src)
  pad = 5
  garbage_b = jnp.full((pad,) + b.shape[1:], 1e3)
  b_pad = jnp.concatenate([b, garbage_b])
  c_pad = jnp.concatenate([c, jnp.ones(pad)])
  dst_pad = jnp.concatenate([dst, jnp.full(pad, n, dst.dtype)])
  src_pad = jnp.concatenate([src, jnp.full(pad, n, src.dtype)])
  v1, (gp1, gx1, gb1) = loss_and_grads(module, params, feats, b_pad, c_pad, dst_pad, src_pad)
  np.testing.assert_allclose(v1, v0, rtol=1e-13)
  np.testing.assert_allclose(gx1, gx0, atol=1e-12)
  np.testing.assert_allclose(gb1[: len(dst)], gb0, atol=1e-12)
  assert np.all(np.asarray(gb1[len(dst) :]) == 0)
  for a, bb in zip(jax.tree_util.tree_leaves(gp1), jax.tree_util.tree_leaves(gp0)):
    np.testing.assert_allclose(a, bb, atol=1e-11)


def test_isolated_atoms_zero_message_finite_gradient(cluster, feats):
  pos, dst, src = cluster
  n = len(pos)
  module = attn(output_bias_init=jax.nn.initializers.ones)
  b, c = pair_basis(pos, dst, src)
  params = module.init(jax.random.PRNGKey(0), feats, b, c, dst_idx=dst, src_idx=src, num_segments=n)
  # atom 0 loses all its pairs as centre; atom 1 keeps its pairs but with cutoff 0
  keep = dst != 0
  c2 = jnp.where(jnp.asarray(dst[keep]) == 1, 0.0, c[keep])
  (_, grads) = loss_and_grads(module, params, feats, b[keep], c2, dst[keep], src[keep])
  y = jitted(module, n)(params, feats, b[keep], c2, dst[keep], src[keep])
  for i in (0, 1):
    np.testing.assert_array_equal(y[i, 0, 0], np.ones(F))  # only the output bias
    np.testing.assert_array_equal(y[i, :, 1:], 0.0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  # no pairs at all
  e = jnp.zeros((0,), jnp.int32)
  y0 = module.apply(params, feats, b[:0], c[:0], dst_idx=e, src_idx=e, num_segments=n)
  np.testing.assert_array_equal(y0[:, 0, 0], np.ones((n, F)))


def test_segment_softmax_extreme_logits_float32():
  logits = jnp.array([[0.0], [150.0], [-5.0], [200.0], [-120.0], [3.0]], jnp.float32)
  weights = jnp.array([1.0, 0.0, 1.0, 0.0, 0.5, 1.0], jnp.float32)
  seg = jnp.array([0, 0, 0, 1, 1, 2])
  valid = jnp.array([True] * 5 + [False])
  u, inv = segment_softmax(logits, weights, valid, seg, 3)
  w = np.asarray(u * inv[seg])[:, 0]
  e = np.exp([0.0, -5.0])
  np.testing.assert_allclose(w[[0, 2]], e / e.sum(), rtol=1e-6)
  assert w[1] == 0 and w[3] == 0 and w[5] == 0
  np.testing.assert_allclose(w[4], 1.0, rtol=1e-6)  # alone in its segment, despite -120
  assert float(inv[2, 0]) == 0.0

  def f(logits, weights):
    u, inv = segment_softmax(logits, weights, valid, seg, 3)
    return jnp.sum(u * inv[seg] * jnp.arange(6.0)[:, None])

  g = jax.grad(f, argnums=(0, 1))(logits, weights)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)
  assert float(g[0][1, 0]) == 0.0 and float(g[0][3, 0]) == 0.0


def test_extreme_logits_in_layer_float32(cluster, feats):
  pos, dst, src = cluster
  big = jax.nn.initializers.normal(stddev=30.0)
  module = attn(param_dtype=jnp.float32, query_kernel_init=big, key_kernel_init=big)
  x = feats.astype(jnp.float32)
  b, c = pair_basis(pos, dst, src, dtype=jnp.float32)
  params = module.init(jax.random.PRNGKey(0), x, b, c, dst_idx=dst, src_idx=src, num_segments=7)
  _, grads = loss_and_grads(module, params, x, b, c, dst, src)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  # reference in float64 with the same parameters
  p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
  m64 = attn(query_kernel_init=big, key_kernel_init=big)
  b64, c64 = pair_basis(pos, dst, src)
  y64 = m64.apply(p64, x.astype(jnp.float64), b64, c64, dst_idx=dst, src_idx=src, num_segments=7)
  y32 = module.apply(params, x, b, c, dst_idx=dst, src_idx=src, num_segments=7)
  # (the explicit 150/200-apart logits are tested on segment_softmax above; here the large
  # query/key weights make the layer's own logits spread widely)
  assert np.all(np.isfinite(np.asarray(y32)))
  np.testing.assert_allclose(y32, y64, atol=2e-3 * float(jnp.abs(y64).max()))


def test_continuity_across_cutoff():
  # Atom 2 moves radially away from centre 0 through the cutoff.
  base = np.array([[0.0, 0, 0], [1.2, 0.3, 0.1], [0, 0, 0]])
  direction = np.array([0.3, 0.8, -0.52])
  direction /= np.linalg.norm(direction)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 1, 4, F)))
  module = pt.SelfAttention(max_degree=1, param_dtype=jnp.float64)
  dst = np.array([0, 0, 1, 1, 2, 2])
  src = np.array([1, 2, 0, 2, 0, 1])

  def out(d):
    pos = base.copy()
    pos[2] = d * direction
    b, c = pair_basis(pos, dst, src, L=1)
    return b, c

  b, c = out(2.0)
  params = module.init(jax.random.PRNGKey(0), x, b, c, dst_idx=dst, src_idx=src, num_segments=3)

  def y_of(d):
    pos = jnp.asarray(base).at[2].set(d * jnp.asarray(direction))
    r = pos[src] - pos[dst]
    b, c = pt.basis(
      r,
      max_degree=1,
      num=6,
      radial_fn=pt.reciprocal_bernstein,
      cutoff_fn=functools.partial(pt.smooth_cutoff, cutoff=RC),
      return_cutoff=True,
    )
    return module.apply(params, x, b, c, dst_idx=dst, src_idx=src, num_segments=3)

  y_of = jax.jit(y_of)
  # Only centre 0's pair to atom 2 crosses the cutoff (atom 1's pair to 2 stays inside).
  y_in, y_out = y_of(RC - 1e-3)[0], y_of(RC + 1e-3)[0]
  np.testing.assert_allclose(y_in, y_out, atol=1e-8)
  assert float(jnp.abs(y_of(RC - 0.5)[0] - y_out).max()) > 1e-4
  dy = jax.jit(jax.jacfwd(lambda d: y_of(d)[0]))
  np.testing.assert_allclose(dy(RC - 1e-3), dy(RC + 1e-3), atol=1e-8)
  assert float(jnp.abs(dy(RC - 0.5)).max()) > 1e-4  # the pair does matter inside


def test_batched_vmap_jit_grad(cluster, feats):
  pos, dst, src = cluster
  module = attn()
  params, y = make(pos, dst, src, feats, module)
  rot = so3.random_rotation(4)
  pos2, x2 = pos @ rot.T, transform(feats, rot)
  b1, c1 = pair_basis(pos, dst, src)
  b2, c2 = pair_basis(pos2, dst, src)
  xb, bb, cb = jnp.stack([feats, x2]), jnp.stack([b1, b2]), jnp.stack([c1, c2])
  db, sb = jnp.stack([dst, dst]), jnp.stack([src, src])
  y_batch = jax.jit(lambda p, x, b, c: module.apply(p, x, b, c, dst_idx=db, src_idx=sb))(
    params, xb, bb, cb
  )
  np.testing.assert_allclose(y_batch[0], y, atol=1e-12)
  np.testing.assert_allclose(y_batch[1], transform(y, rot), atol=1e-10)
  y_vmap = jax.vmap(
    lambda x, b, c: module.apply(params, x, b, c, dst_idx=dst, src_idx=src, num_segments=len(pos))
  )(xb, bb, cb)
  np.testing.assert_allclose(y_vmap, y_batch, atol=1e-12)
  g = jax.grad(lambda x: jnp.sum(module.apply(params, x, bb, cb, dst_idx=db, src_idx=sb) ** 2))(xb)
  assert g.shape == xb.shape and np.all(np.isfinite(np.asarray(g)))


def test_errors_and_no_basis(cluster, feats):
  pos, dst, src = cluster
  with pytest.raises(TypeError, match="basis"):
    attn().init(jax.random.PRNGKey(0), feats, dst_idx=dst, src_idx=src)
  with pytest.raises(ValueError, match="divisible"):
    make(pos, dst, src, feats, attn(qkv_features=9))
  module = attn(use_relative_positional_encoding_qk=False, use_relative_positional_encoding_v=False)
  params = module.init(jax.random.PRNGKey(0), feats, dst_idx=dst, src_idx=src)
  y = module.apply(params, feats, dst_idx=dst, src_idx=src)
  assert y.shape == feats.shape
