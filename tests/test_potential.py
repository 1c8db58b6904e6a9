import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import potentials as pt
from potentials import so3
from conftest import all_pairs, random_cluster

RC = 3.0
HYPER = dict(
  features=8, max_degree=2, num_iterations=2, num_heads=2, num_basis=6, product=True, radial_mlp=4
)  # the physics tests below cover both options too


@pytest.fixture(scope="module")
def pot():
  p = pt.Potential.create(1, species=["H", "C", "O"], cutoff=RC, **HYPER)
  # non-trivial per-element shift/scale, so tests see them
  params = dict(p.params)
  params["shift"] = np.array([-13.6, -1030.0, -2040.0], np.float32)
  params["scale"] = np.array([0.7, 1.3, 2.0], np.float32)
  return p.replace(params=_randomise_products(params))


def _randomise_products(params, seed=0):
  """Product outputs start at zero; random ones make every test here exercise them."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in params.items():
    if k.startswith("product_"):
      v = {
        **v,
        "out": {"kernel": rng.normal(0, 0.5, np.shape(v["out"]["kernel"])).astype(np.float32)},
      }
    out[k] = v
  assert any(k.startswith("product_") for k in out)
  return out


@pytest.fixture(scope="module")
def system():
  pos = random_cluster(8, seed=11, box=3.5)
  z = np.array([6, 1, 1, 8, 1, 6, 1, 8])
  return z, pos


@functools.lru_cache(maxsize=None)
def _fns(pot):
  f = pot.atomic_energies_fn()
  e = jax.jit(f)
  total = lambda *a: jnp.sum(f(*a))
  return e, jax.jit(jax.value_and_grad(total, argnums=2))


def energies(pot, z, pos, dst=None, src=None, mask=None):
  if dst is None:
    dst, src = all_pairs(pos, RC)
  e, _ = _fns(pot)
  return np.asarray(
    e(
      pot.params,
      jnp.asarray(pot.species_index(z)),
      jnp.asarray(pos),
      jnp.asarray(dst),
      jnp.asarray(src),
      None,
      None,
      mask,
    )
  )


def energy_forces(pot, z, pos):
  dst, src = all_pairs(pos, RC)
  _, ef = _fns(pot)
  e, g = ef(
    pot.params,
    jnp.asarray(pot.species_index(z)),
    jnp.asarray(pos),
    jnp.asarray(dst),
    jnp.asarray(src),
    None,
    None,
    None,
  )
  return float(e), -np.asarray(g)


def test_invariance_and_force_equivariance(pot, system):
  z, pos = system
  e0, f0 = energy_forces(pot, z, pos)
  assert np.abs(f0).max() > 1e-3
  for seed, reflect in [(0, False), (1, True), (5, True)]:
    rot = so3.random_rotation(seed, reflect=reflect)
    t = np.array([1.5, -20.0, 3.3])
    e1, f1 = energy_forces(pot, z, pos @ rot.T + t)
    assert abs(e1 - e0) <= 1e-10 * abs(e0)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-10 * np.abs(f0).max())
  perm = np.random.default_rng(2).permutation(len(z))
  e2, f2 = energy_forces(pot, z[perm], pos[perm])
  assert abs(e2 - e0) <= 1e-10 * abs(e0)
  np.testing.assert_allclose(f2, f0[perm], atol=1e-10 * np.abs(f0).max())


def test_forces_match_finite_differences(pot, system):
  z, pos = system
  _, f = energy_forces(pot, z, pos)
  h = 1e-5
  fd = np.zeros_like(pos)
  for i in range(len(z)):
    for a in range(3):
      p, m = pos.copy(), pos.copy()
      p[i, a] += h
      m[i, a] -= h
      fd[i, a] = -(energies(pot, z, p).sum() - energies(pot, z, m).sum()) / (2 * h)
  np.testing.assert_allclose(f, fd, atol=1e-6 * max(1.0, np.abs(f).max()))


def test_atomic_energies_sum_and_convenience_api(pot, system):
  z, pos = system
  dst, src = all_pairs(pos, RC)
  ea = pot.atomic_energies(z, pos, dst, src)
  e, f = pot.energy_and_forces(z, pos, dst, src)
  np.testing.assert_allclose(ea.sum(), e, rtol=1e-12)
  np.testing.assert_allclose(pot.energy(z, pos, dst, src), e, rtol=1e-12)
  e_ref, f_ref = energy_forces(pot, z, pos)
  np.testing.assert_allclose(f, f_ref, atol=1e-10)


def test_padding_atoms_and_pairs_change_nothing(pot, system):
  z, pos = system
  dst, src = all_pairs(pos, RC)
  ref = energies(pot, z, pos, dst, src)
  n, extra_atoms, extra_pairs = len(z), 3, 7
  n_tot = n + extra_atoms
  z_pad = np.concatenate([z, [1, 1, 6]])
  pos_pad = np.concatenate([pos, pos[:3] + 0.1])  # padded atoms overlap real ones: still inert
  dst_pad = np.concatenate([dst, np.full(extra_pairs, n_tot)])
  src_pad = np.concatenate([src, np.full(extra_pairs, n_tot)])
  mask = jnp.asarray(np.arange(n_tot) < n)
  e = energies(pot, z_pad, pos_pad, dst_pad, src_pad, mask)
  np.testing.assert_allclose(e[:n], ref, atol=1e-12)
  assert np.all(e[n:] == 0)
  f = pot.atomic_energies_fn()
  g = jax.jit(
    jax.grad(
      lambda p: jnp.sum(
        f(
          pot.params,
          jnp.asarray(pot.species_index(z_pad)),
          p,
          jnp.asarray(dst_pad),
          jnp.asarray(src_pad),
          None,
          None,
          mask,
        )
      )
    )
  )(jnp.asarray(pos_pad))
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g[n:]) == 0)


def test_isolated_atom_energy_is_its_shift(pot):
  for z, shift in [(1, -13.6), (6, -1030.0), (8, -2040.0)]:
    got = pot.energy(np.array([z]), np.zeros((1, 3)), np.zeros(0, int), np.zeros(0, int))
    assert got == pytest.approx(float(np.float32(shift)), abs=1e-9)  # shifts are float32 params
  # two atoms beyond the cutoff, and an atom listed only with padded pairs: still the shifts
  got = pot.energy(
    np.array([6, 8]), np.array([[0, 0, 0], [RC + 0.01, 0, 0]]), np.array([0, 1]), np.array([1, 0])
  )
  assert got == pytest.approx(-3070.0, abs=1e-9)  # exactly representable
  got = pot.energy(np.array([1]), np.zeros((1, 3)), np.array([1, 1]), np.array([1, 1]))
  assert got == pytest.approx(float(np.float32(-13.6)), abs=1e-9)


def test_far_apart_molecules_add(pot, system):
  z, pos = system
  other = random_cluster(5, seed=4, box=3.0)
  z2 = np.array([8, 1, 1, 6, 1])
  far = other + np.array([3 * RC + 4.0, 0, 0])
  both_z = np.concatenate([z, z2])
  both = np.concatenate([pos, far])
  e_sum = energies(pot, z, pos).sum() + energies(pot, z2, other).sum()
  np.testing.assert_allclose(energies(pot, both_z, both).sum(), e_sum, rtol=1e-12)


def test_energy_c1_across_cutoff(pot):
  # atom 1 moves along a line through the cutoff of atoms 0 and 2
  base = np.array([[0.0, 0, 0], [0, 0, 0], [0.4, 1.1, 0.3]])
  z = np.array([6, 1, 8])
  u = np.array([1.0, 0.2, -0.1]) / np.linalg.norm([1.0, 0.2, -0.1])

  def e_at(d):
    pos = base.copy()
    pos[1] = d * u
    dst, src = all_pairs(pos, RC + 0.5)  # list beyond the cutoff: the model must cut smoothly
    return energies(pot, z, pos, dst, src).sum()

  d0, h = RC, 1e-4  # |r_01| = d0: the pair sits exactly at the cutoff
  # second-order one-sided differences: they agree to O(h^2) iff dE/dd is continuous at d0
  left = (3 * e_at(d0) - 4 * e_at(d0 - h) + e_at(d0 - 2 * h)) / (2 * h)
  right = (-3 * e_at(d0) + 4 * e_at(d0 + h) - e_at(d0 + 2 * h)) / (2 * h)
  assert abs(left - right) < 1e-6, (left, right)
  assert abs(e_at(d0 - 0.8) - e_at(d0 + 0.3)) > 1e-6  # the pair matters inside the cutoff


def test_unknown_element_error(pot, system):
  _, pos = system
  with pytest.raises(pt.UnknownElementError, match=r"Cu \(Z=29\).*H, C, O"):
    pot.energy(np.array([29] + [1] * 7), pos, [0], [1])
  with pytest.raises(ValueError, match="not finite"):
    bad = pos.copy()
    bad[3, 1] = np.nan
    pot.energy(np.array([1] * 8), bad, [0], [1])


@pytest.mark.slow  # training batches run many systems by default
def test_vmap_over_systems(pot, system):
  z, pos = system
  dst, src = all_pairs(pos, RC)
  rot = so3.random_rotation(3)
  f = pot.atomic_energies_fn()
  sp = jnp.asarray(pot.species_index(z))
  batch = jnp.stack([jnp.asarray(pos), jnp.asarray(pos @ rot.T)])
  e = jax.vmap(lambda p: jnp.sum(f(pot.params, sp, p, jnp.asarray(dst), jnp.asarray(src))))(batch)
  np.testing.assert_allclose(e[0], e[1], rtol=1e-12)
  np.testing.assert_allclose(e[0], energies(pot, z, pos).sum(), rtol=1e-12)


def test_save_load_roundtrip(pot, system, tmp_path):
  z, pos = system
  pot = pot.replace(metadata={"provenance": {"data": "test", "seed": 1}, "note": "ok"})
  path = tmp_path / "m.eqm"
  pot.save(path)
  back = pt.load(path)
  assert back.config == pot.config and back.species == pot.species
  assert back.metadata == pot.metadata
  for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(pot.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).dtype == np.asarray(b).dtype
  np.testing.assert_array_equal(energies(back, z, pos), energies(pot, z, pos))


def test_corrupt_files(pot, tmp_path):
  path = tmp_path / "m.eqm"
  pot.save(path)
  data = path.read_bytes()
  cases = {
    "truncated": data[:-100],
    "flipped": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:],
    "header_only": data[:20],
    "not_model": b"hello world, definitely not a model" * 10,
    "version": data[:13] + (99).to_bytes(4, "little") + data[17:],
  }
  messages = {
    "truncated": "truncated",
    "flipped": "corrupt",
    "header_only": "truncated",
    "not_model": "not an eqattn model",
    "version": "version 99",
  }
  for name, blob in cases.items():
    p = tmp_path / f"{name}.eqm"
    p.write_bytes(blob)
    with pytest.raises(pt.ModelFileError, match=messages[name]):
      pt.load(p)
  with pytest.raises(FileNotFoundError, match="shipped models"):
    pt.load(tmp_path / "missing.eqm")
  with pytest.raises(ValueError, match="JSON-like"):
    pot.replace(metadata={"x": object()}).save(tmp_path / "bad.eqm")


def test_config_validation():
  with pytest.raises(ValueError, match="num_heads"):
    pt.ModelConfig(features=10, num_heads=3)
  with pytest.raises(ValueError, match="unknown model config keys"):
    pt.ModelConfig.from_dict({"cutoff": 5.0, "bogus": 1})
  with pytest.raises(ValueError, match="species"):
    pt.Potential.create(0, species=["H", "H"])


def test_product_option_and_old_files(system):
  # files written before the option describe the model without it; a new model's products
  # start at zero, so it begins as the model without them
  assert pt.ModelConfig.from_dict({"cutoff": 5.0}).product is False
  assert pt.ModelConfig().product is False
  z, pos = system
  kw = dict(
    species=["H", "C", "O"],
    cutoff=RC,
    **{k: v for k, v in HYPER.items() if k not in ("product", "radial_mlp")},
  )
  on, off = pt.Potential.create(1, product=True, **kw), pt.Potential.create(1, **kw)
  assert "product_0" in on.params and "product_0" not in off.params
  dst, src = all_pairs(pos, RC)
  np.testing.assert_allclose(on.energy(z, pos, dst, src), off.energy(z, pos, dst, src), rtol=1e-12)
  # the randomised products of the fixture change the energy
  with_products = on.replace(params=_randomise_products(on.params))
  assert abs(with_products.energy(z, pos, dst, src) - on.energy(z, pos, dst, src)) > 1e-3


@pytest.mark.slow  # a second radial option; the default one runs everywhere
def test_radial_mlp_option(system):
  # files written before the option describe the model without it
  assert pt.ModelConfig.from_dict({"cutoff": 5.0}).radial_mlp == 0
  with pytest.raises(ValueError, match="radial_mlp"):
    pt.ModelConfig(radial_mlp=-1)
  kw = dict(
    species=["H", "C", "O"],
    cutoff=RC,
    features=8,
    max_degree=1,
    num_iterations=2,
    num_heads=1,
    num_basis=4,
    density_features=False,
  )
  on, off = pt.Potential.create(0, radial_mlp=6, **kw), pt.Potential.create(0, **kw)
  assert on.params["radial_1"]["out"]["kernel"].shape == (6, 6)
  assert "radial_0" not in off.params
  # the filters read the MLP's 6 radial channels instead of the 4 basis functions
  assert on.params["attention_0"]["filter"]["kernel"].shape[-2] == 6
  z, pos = system
  dst, src = all_pairs(pos, RC)
  e_on, e_off = on.energy(z, pos, dst, src), off.energy(z, pos, dst, src)
  assert np.isfinite(e_on) and abs(e_on - e_off) > 1e-4


def test_density_features_option():
  # files written before the option existed describe the model without it
  assert pt.ModelConfig.from_dict({"cutoff": 5.0}).density_features is False
  assert pt.ModelConfig().density_features is True
  on = pt.Potential.create(
    0,
    species=["Cu"],
    cutoff=RC,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=1,
    num_basis=4,
  )
  off = pt.Potential.create(
    0,
    species=["Cu"],
    cutoff=RC,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=1,
    num_basis=4,
    density_features=False,
  )
  assert "density" in on.params and "density" not in off.params
  # an atom with 1 vs 2 neighbours at the same distance on opposite sides: attention alone
  # averages identical messages and cannot tell them apart; the density can
  z = np.array([29, 29, 29])
  three = np.array([[0.0, 0, 0], [2.5, 0, 0], [-2.5, 0, 0]])
  centre = lambda p, pos: p.atomic_energies(z[: len(pos)], pos, *all_pairs(pos, RC))[0]
  assert abs(centre(off, three) - centre(off, three[:2])) < 1e-6
  assert abs(centre(on, three) - centre(on, three[:2])) > 1e-4


@pytest.mark.parametrize(
  "extra",
  [
    None,
    pytest.param(
      dict(density_features=False, readout_heads=2, committee=2), marks=pytest.mark.slow
    ),
  ],
)
def test_stages_chain_to_the_whole_model(pot, system, extra):
  """Potential.stage_fn, one hop at a time (what LAMMPS exchanges features between), chains to
  atomic_energies_from_pairs_fn exactly; stage arguments are checked."""
  z, pos = system
  if extra is not None:
    kw = {k: v for k, v in HYPER.items() if k not in ("product", "radial_mlp")}
    pot = pt.Potential.create(2, species=["H", "C", "O"], cutoff=RC, **{**kw, **extra})
  assert pot.num_stages == pot.config.num_iterations + int(pot.config.density_features)
  dst, src = (jnp.asarray(i) for i in all_pairs(pos, RC))
  sp, r = (
    jnp.asarray(pot.species_index(z)),
    jnp.asarray(pos[np.asarray(src)] - pos[np.asarray(dst)]),
  )
  x = None
  for s in range(pot.num_stages):
    x = pot.stage_fn(s)(pot.params, sp, r, dst, src, features=x)
  whole = pot.atomic_energies_from_pairs_fn(include_shift=False)(pot.params, sp, r, dst, src)
  np.testing.assert_allclose(x, whole, rtol=1e-6, atol=1e-6)
  assert x.shape == (len(z),)
  one = pot.members()[0]  # the flax module takes one network's parameters (a committee has K)
  apply = lambda **k: one.model.apply({"params": one.params}, sp, r, dst, src, **k)
  with pytest.raises(ValueError, match="stage must be in"):
    apply(stage=pot.num_stages)
  with pytest.raises(ValueError, match="features are the input of stages after the first"):
    apply(stage=1)
