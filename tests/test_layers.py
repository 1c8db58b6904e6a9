import jax
import jax.numpy as jnp
import numpy as np
import pytest

import potentials as pt
from potentials import so3
from potentials.layers import tensor_product


def transform(x, rot, cartesian_order=True):
  P, Q = x.shape[-3], x.shape[-2]
  L = int(np.sqrt(Q)) - 1
  m = so3.feature_transform(rot, P, L, cartesian_order=cartesian_order)
  return jnp.einsum("pqr,...prf->...pqf", m, x)


def features(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


ROTS = [so3.random_rotation(1), so3.random_rotation(2, reflect=True)]


@pytest.mark.parametrize("P,L", [(1, 2), (2, 2), (2, 3)])
def test_dense_equivariant_and_bias_only_on_scalars(P, L):
  x = features((4, P, (L + 1) ** 2, 5))
  layer = pt.Dense(6, bias_init=jax.nn.initializers.ones, param_dtype=jnp.float64)
  params = layer.init(jax.random.PRNGKey(0), x)
  assert params["params"]["kernel"].shape == (P, L + 1, 5, 6)
  for rot in ROTS:
    np.testing.assert_allclose(
      layer.apply(params, transform(x, rot)), transform(layer.apply(params, x), rot), atol=1e-12
    )
  y0 = layer.apply(params, jnp.zeros_like(x))
  assert np.all(np.asarray(y0[..., 0, 0, :]) == 1.0)
  assert np.count_nonzero(np.asarray(y0)) == 4 * 6


def reference_tensor(x1, x2, weights, paths, P3, L3):
  """Path-by-path with full coupling blocks (slow, obviously correct)."""
  out = np.zeros(
    np.broadcast_shapes(x1.shape[:-3], x2.shape[:-3]) + (P3, (L3 + 1) ** 2, x1.shape[-1])
  )
  for n, ((i1, l1), (i2, l2), (i3, l3)) in enumerate(paths):
    c = so3.clebsch_gordan(l1, l2, l3)
    a = np.asarray(x1)[..., i1, l1 * l1 : (l1 + 1) ** 2, :]
    b = np.asarray(x2)[..., i2, l2 * l2 : (l2 + 1) ** 2, :]
    out[..., i3, l3 * l3 : (l3 + 1) ** 2, :] += np.einsum(
      "...af,...bf,abc->...cf", a, b, c
    ) * np.asarray(weights[n])
  return out


@pytest.mark.parametrize(
  "p1,L1,p2,L2,P3,L3",
  [
    (1, 2, 1, 2, 1, 2),
    (2, 2, 2, 1, 2, 3),
    (1, 0, 1, 3, 1, 3),
    (2, 1, 1, 0, 2, 1),
    (1, 2, 2, 2, 2, 1),
  ],
)
def test_tensor_product_matches_reference(p1, L1, p2, L2, P3, L3):
  x1 = features((3, p1, (L1 + 1) ** 2, 4), 1)
  x2 = features((3, p2, (L2 + 1) ** 2, 4), 2)
  paths = so3.coupling_paths(p1, L1, p2, L2, L3, P3)
  w = features((len(paths), 4), 3)
  np.testing.assert_allclose(
    tensor_product(x1, x2, w, paths, P3, L3), reference_tensor(x1, x2, w, paths, P3, L3), atol=1e-12
  )


@pytest.mark.parametrize("module", [pt.Tensor, pt.FusedTensor])
@pytest.mark.parametrize("pseudo", [True, False])
def test_tensor_layers_equivariant(module, pseudo):
  x1 = features((3, 2, 9, 4), 4)
  x2 = features((3, 1, 16, 4), 5)
  layer = module(max_degree=3, include_pseudotensors=pseudo, param_dtype=jnp.float64)
  params = layer.init(jax.random.PRNGKey(1), x1, x2)
  y = layer.apply(params, x1, x2)
  assert y.shape == (3, 2 if pseudo else 1, 16, 4)
  assert np.abs(np.asarray(y)).max() > 1e-3
  for rot in ROTS:
    np.testing.assert_allclose(
      layer.apply(params, transform(x1, rot), transform(x2, rot)), transform(y, rot), atol=1e-12
    )


def test_pseudotensor_sign_under_reflection():
  # cross product of two polar vectors is axial: it must NOT flip under inversion.
  a = jnp.zeros((1, 1, 4, 1)).at[0, 0, 1:4, 0].set(jnp.array([1.0, 0, 0]))
  b = jnp.zeros((1, 1, 4, 1)).at[0, 0, 1:4, 0].set(jnp.array([0.0, 1, 0]))
  paths = so3.coupling_paths(1, 1, 1, 1, 1, 2)
  y = tensor_product(a, b, jnp.ones((len(paths), 1)), paths, 2, 1)
  axial = np.asarray(y[0, 0, 1:4, 0])  # parity +1 channel, l = 1
  np.testing.assert_allclose(axial, [0, 0, 1 / np.sqrt(2)], atol=1e-14)
  inv = -np.eye(3)
  y_inv = tensor_product(
    transform(a, inv), transform(b, inv), jnp.ones((len(paths), 1)), paths, 2, 1
  )
  np.testing.assert_allclose(y_inv, y, atol=1e-14)  # both inputs flip: product unchanged
  np.testing.assert_allclose(transform(y, inv), y, atol=1e-14)  # and axial vectors don't flip


def test_gate_equivariant():
  x = features((5, 2, 9, 3), 6)
  layer = pt.Gate(param_dtype=jnp.float64)
  params = layer.init(jax.random.PRNGKey(2), x)
  y = layer.apply(params, x)
  np.testing.assert_allclose(y[..., 0, 0, :], jax.nn.silu(x[..., 0, 0, :]))
  for rot in ROTS:
    np.testing.assert_allclose(
      layer.apply(params, transform(x, rot)), transform(y, rot), atol=1e-12
    )


def test_change_max_degree_or_type_roundtrip():
  x = features((2, 1, 9, 3), 7)
  x2 = pt.change_max_degree_or_type(x, include_pseudotensors=True)
  assert x2.shape == (2, 2, 9, 3)
  for rot in ROTS:  # same object in the other layout: still transforms consistently
    np.testing.assert_allclose(
      transform(x2, rot), pt.change_max_degree_or_type(transform(x, rot), None, True), atol=1e-12
    )
  np.testing.assert_array_equal(pt.change_max_degree_or_type(x2, include_pseudotensors=False), x)
  assert pt.change_max_degree_or_type(x, 1).shape == (2, 1, 4, 3)
  padded = pt.change_max_degree_or_type(x, 3)
  np.testing.assert_array_equal(padded[..., :9, :], x)
  assert np.all(np.asarray(padded[..., 9:, :]) == 0)


def test_bad_shapes():
  with pytest.raises(ValueError, match="degree axis"):
    pt.max_degree_of((3, 1, 5, 2))
  with pytest.raises(ValueError, match="parity axis"):
    pt.max_degree_of((3, 3, 4, 2))


def test_embed_and_float32():
  emb = pt.Embed(num_embeddings=4, features=3)
  params = emb.init(jax.random.PRNGKey(0), jnp.array([0, 1]))
  y = emb.apply(params, jnp.array([0, 3, 1]))
  assert y.shape == (3, 1, 1, 3) and y.dtype == jnp.float32
  layer = pt.Dense(4)
  p = layer.init(jax.random.PRNGKey(0), jnp.ones((2, 1, 4, 3), jnp.float32))
  assert layer.apply(p, jnp.ones((2, 1, 4, 3), jnp.float32)).dtype == jnp.float32


def test_split_blocks_round_trips_and_its_gradient_is_one_array():
  """split_blocks is merge_blocks' inverse, and its gradient is one concatenate: per-component
  slices made a zero-padded copy of the whole input each (21 per-pair copies of the basis were
  alive at once in the copper model's force program)."""
  from potentials.layers import merge_blocks, split_blocks

  x = features((7, 2, 9, 3))
  blocks = split_blocks(x)
  assert sorted(blocks) == [(p, l) for p in range(2) for l in range(3)]
  assert blocks[(1, 2)][4].shape == (7, 3)
  np.testing.assert_array_equal(merge_blocks(blocks, 2, 2), x)
  w = features((2, 9, 3), seed=1)
  loss = lambda x: sum(
    jnp.sum(c * w[p, l * l + i]) for (p, l), b in split_blocks(x).items() for i, c in enumerate(b)
  )
  np.testing.assert_allclose(jax.grad(loss)(x), jnp.broadcast_to(w, x.shape), atol=1e-12)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x))
  assert "pad" not in jaxpr and jaxpr.count("concatenate") == 1
