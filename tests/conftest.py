"""Shared fixtures. Tests run with float64 enabled; float32 paths cast explicitly.

XLA compilation is most of the suite's time, so the session (1) compiles with LLVM's
optimisation off (a test program runs a few times; compiling it twice as fast wins, and the
arithmetic is the same IEEE arithmetic), and (2) keeps compiled programs in a persistent cache
under .pytest_cache (shared by identical programs of different tests, and by later runs).
``EQATTN_CACHE_DIR`` moves or disables the cache (``plugin.cache``); the CLI tests use it too.
"""

import functools
import gc
import os
from pathlib import Path

_OPT0 = "--xla_backend_optimization_level=0"
if _OPT0 not in os.environ.get("XLA_FLAGS", "").split():  # xdist workers inherit it
  os.environ["XLA_FLAGS"] = " ".join(  # read when the backend starts, at the first computation
    [os.environ.get("XLA_FLAGS", ""), _OPT0]
  ).strip()
os.environ.setdefault(
  "EQATTN_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "eqattn-xla")
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import plugin  # noqa: E402
from plugin import jax_md_import  # noqa: E402

# the suite's processes are its own: JAX-MD's submodules load on first use, as in `eqattn`
jax_md_import.install()

jax.config.update("jax_enable_x64", True)
plugin.enable_compilation_cache()


# The heaviest files first (by their time with a cold compilation cache): pytest-xdist
# hands out whole files in collection order, so a heavy file collected last would leave one
# worker running it alone at the end. Files not named keep their order after these.
HEAVY_FIRST = (
  "test_electrostatics_model.py",
  "test_training.py",
  "test_lammps.py",
  "test_learn.py",
  "test_md_replicas.py",
  "test_potential.py",
  "test_md.py",
  "test_force_readout.py",
  "test_examples.py",
  "test_ensemble.py",
  "test_cli.py",
  "test_testing.py",
  "test_conservation.py",
  "test_attention.py",
  "test_observables.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within files


class TickClock:
  """A clock that moves one second at each reading: a budget becomes a count of readings,
  the same on any machine. ``stop_after`` readings, it interrupts the run (a kill)."""

  def __init__(self, stop_after=None):
    self.now, self.stop_after = 0.0, stop_after

  def __call__(self):
    self.now += 1.0
    if self.stop_after is not None and self.now > self.stop_after:
      raise KeyboardInterrupt
    return self.now


def random_cluster(n: int, seed: int = 0, box: float = 4.0) -> np.ndarray:
  """n atoms in a box with no two closer than 0.8 Å."""
  rng = np.random.default_rng(seed)
  pos = []
  while len(pos) < n:
    p = rng.uniform(0, box, 3)
    if all(np.linalg.norm(p - q) > 0.8 for q in pos):
      pos.append(p)
  return np.asarray(pos)


def all_pairs(pos: np.ndarray, cutoff: float):
  """Full directed pair list (dst sorted) of all pairs closer than cutoff."""
  n = len(pos)
  d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  dst, src = np.nonzero((d < cutoff) & ~np.eye(n, dtype=bool))
  return dst.astype(np.int32), src.astype(np.int32)


def tiny_copper_potential(cutoff: float = 3.0):
  """A small random Cu model scaled to forces of ~1 eV/Å (as in a real metal at room
  temperature), so MD tests move atoms through a real landscape; shift = a lone atom's energy.
  Without density features: a random density term times the scale of 20 makes forces ~10x
  larger than that (the model tests cover density features)."""
  import jax.numpy as jnp
  import potentials

  p = potentials.Potential.create(
    0,
    species=["Cu"],
    cutoff=cutoff,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=2,
    num_basis=6,
    density_features=False,
  )
  return p.replace(
    params=dict(
      p.params, scale=jnp.array([20.0], jnp.float32), shift=jnp.array([-3.5], jnp.float32)
    )
  )


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop JAX's compiled programs after each test module. Every loaded XLA:CPU executable
  keeps a few memory maps of JIT code; a worker that kept every program of the suite passed
  30 000 maps within minutes, and at the kernel's vm.max_map_count (65530) XLA segfaults
  loading the next program (seen twice, in test_training.py, late in full runs). Programs a
  later module needs again come back from the persistent cache."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def cluster():
  pos = random_cluster(7, seed=3)
  dst, src = all_pairs(pos, 3.5)
  return pos, dst, src


@pytest.fixture(scope="session")
def hco_cluster():
  """``(numbers, positions, dst, src)``: 6 H/C/O atoms, full pair list at a 3 Å cutoff."""
  pos = random_cluster(6, seed=4, box=3.0)
  dst, src = all_pairs(pos, 3.0)
  return np.array([6, 8, 1, 1, 1, 6]), pos, dst, src


def assert_jax_md_spread_matches(pot, atoms, results):
  """``plugin.jax_md.uncertainty_fn`` of ``pot`` on ``atoms`` (open, float32, jitted) gives
  the ASE calculator's ``energy_uncertainty`` and ``forces_uncertainty`` in ``results``."""
  import jax.numpy as jnp
  from jax_md import space

  from plugin import jax_md as pjm

  disp, _ = space.free()
  nbr, efn = pjm.neighbor_list(
    pot, disp, 20.0, atomic_numbers=atoms.numbers, disable_cell_list=True
  )
  R = jnp.asarray(atoms.positions, jnp.float32)
  u = jax.jit(pjm.uncertainty_fn(efn))(R, nbr.allocate(R))
  assert float(u.energy) == pytest.approx(results["energy_uncertainty"], rel=1e-4)
  np.testing.assert_allclose(u.forces, results["forces_uncertainty"], rtol=1e-4, atol=1e-7)


def dimer_fn(pot, fn, numbers=(8, 1)):
  """``at(d, pad)``: jitted ``fn(pot.params, ...)`` (a pure function of ``pot``) on two atoms
  ``d`` Å apart along x plus ``pad`` padded atoms (masked, padded pairs), for padding and
  cutoff checks."""
  import jax.numpy as jnp

  import potentials

  sp = jnp.asarray(pot.species_index(np.asarray(numbers)))

  @functools.partial(jax.jit, static_argnums=1)
  def at(d, pad):
    pos = jnp.stack([jnp.zeros(3), jnp.array([1.0, 0.0, 0.0]) * d, *[jnp.zeros(3)] * pad])
    species = jnp.concatenate([sp, jnp.zeros(pad, sp.dtype)])
    mask = jnp.arange(2 + pad) < 2
    dst, src = jnp.array([0, 1] + [2 + pad] * pad), jnp.array([1, 0] + [2 + pad] * pad)
    r = potentials.ops.pair_vectors(pos, dst, src)
    return fn(pot.params, species_index=species, r=r, dst=dst, src=src, atom_mask=mask)

  return at


def tiny_molecule_potential():
  """A small random H C O model (ethanol's elements) with forces of a few eV/Å: stands in for
  the shipped ethanol model where a test checks a code path, not the trained physics."""
  import potentials

  pot = potentials.Potential.create(
    0,
    species=["H", "C", "O"],
    cutoff=3.0,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=2,
    num_basis=4,
  )
  return pot.replace(params={**pot.params, "scale": np.full(3, 5.0, np.float32)})


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
  """``{"ethanol": path, "copper": path}``: .eqm files of the tiny stand-in models."""
  folder = tmp_path_factory.mktemp("tiny_models")
  paths = {"ethanol": folder / "ethanol.eqm", "copper": folder / "copper.eqm"}
  tiny_molecule_potential().save(paths["ethanol"])
  tiny_copper_potential().save(paths["copper"])
  return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def copper_data(tmp_path_factory):
  """An extxyz file of 12 rattled 4-atom Cu cells labelled by EMT, 4 trajectories of 3."""
  import ase.build
  import ase.io
  from ase.calculators.emt import EMT

  images = []
  for i in range(12):
    a = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=i)
    a.calc = EMT()
    a.get_potential_energy(), a.get_forces()
    a.info.update(trajectory=f"run{i // 3}", config_type="bulk", temperature_K=300.0)
    images.append(a)
  path = tmp_path_factory.mktemp("cu") / "cu.extxyz"
  ase.io.write(path, images)
  return path


SETTINGS = (
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def restore_jax_cache():
  """Put the session's cache settings (conftest) back after a test moved the cache."""
  saved = {k: jax.config.values[k] for k in SETTINGS}
  folder = plugin.cache._FOLDER
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  plugin.cache._FOLDER = folder
  from jax.experimental.compilation_cache import compilation_cache

  compilation_cache.reset_cache()
