"""plugin.exported: traced programs kept on disk while eqattn's cache is enabled; a new
process (here: a new ExportedJit) loads them instead of tracing, with the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import molecule

from plugin import cache, exported
from plugin.ase import Calculator


def make(calls):
  def f(x, y):
    calls.append(1)  # a Python side effect: runs only when f is traced
    return {"sum": jnp.sum(x * y), "scaled": 2.0 * x}

  return f


def test_a_new_instance_loads_instead_of_tracing(tmp_path, restore_jax_cache):
  import plugin

  plugin.enable_compilation_cache(tmp_path)
  x, y = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
  calls = []
  first = exported.ExportedJit(make(calls), "test-f", ("v1",))
  out1 = first(x, y)
  assert len(calls) == 1 and first.builds == 1
  files = list((tmp_path / "exported").iterdir())
  assert len(files) == 1 and files[0].name.startswith("test-f-")
  second = exported.ExportedJit(make(calls), "test-f", ("v1",))  # as in a new process
  out2 = second(x, y)
  assert len(calls) == 1 and second.builds == 1  # loaded, not traced
  np.testing.assert_array_equal(out2["scaled"], out1["scaled"])
  assert float(out2["sum"]) == float(out1["sum"]) == 15.0
  second(x + 1, y)  # same shapes: no new program
  assert second.builds == 1
  second(np.ones((3, 3)), np.ones((3, 3)))  # new shapes: a new program, a new file
  assert second.builds == 2 and len(calls) == 2
  other = exported.ExportedJit(make(calls), "test-f", ("v2",))  # another key: traced again
  other(x, y)
  assert len(calls) == 3 and len(list((tmp_path / "exported").iterdir())) == 3
  # a damaged file is traced again and rewritten
  for path in (tmp_path / "exported").iterdir():
    path.write_bytes(path.read_bytes()[:50])
  third = exported.ExportedJit(make(calls), "test-f", ("v1",))
  assert float(third(x, y)["sum"]) == 15.0 and len(calls) == 4
  fourth = exported.ExportedJit(make(calls), "test-f", ("v1",))
  fourth(x, y)
  assert len(calls) == 4


def test_a_program_jax_export_refuses_runs_as_plain_jit(tmp_path, restore_jax_cache):
  # host callbacks cannot be serialised: nothing is stored, the result is still right
  import plugin

  plugin.enable_compilation_cache(tmp_path)
  calls = []

  def f(x):
    calls.append(1)
    y = jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return {"y": y + 1.0}

  g = exported.ExportedJit(f, "test-callback", ())
  x = np.linspace(0.0, 1.0, 4)
  np.testing.assert_allclose(g(x)["y"], np.sin(x) + 1.0)
  np.testing.assert_allclose(g(x)["y"], np.sin(x) + 1.0)
  assert g.builds == 1 and not list((tmp_path / "exported").glob("test-callback-*"))


def test_a_result_json_cannot_keep_runs_as_plain_jit(tmp_path, restore_jax_cache):
  # tuple keys come back from JSON as lists: storing such a program would break every later
  # process at its first call; it is not stored, and the results are right in both
  import plugin

  plugin.enable_compilation_cache(tmp_path)
  f = lambda x: {(0, 1): 2.0 * x, (1, 0): (x, x + 1.0)}
  x = np.arange(3.0)
  for _ in range(2):  # the second instance, as in a new process
    out = exported.ExportedJit(f, "test-tuple-keys", ())(x)
    np.testing.assert_array_equal(out[(0, 1)], 2.0 * x)
    np.testing.assert_array_equal(out[(1, 0)][1], x + 1.0)
  assert not list((tmp_path / "exported").glob("test-tuple-keys-*"))


def test_without_the_cache_it_is_plain_jit(tmp_path, restore_jax_cache):
  jax.config.update("jax_compilation_cache_dir", None)
  assert cache.current_folder() is None
  calls = []
  f = exported.ExportedJit(make(calls), "test-g", ())
  f(np.ones(3), np.ones(3))
  f(np.ones(3), np.ones(3))
  assert len(calls) == 1 and f.builds == 1


def test_calculator_results_equal_with_and_without_stored_programs(tmp_path, restore_jax_cache):
  # float32, the calculator's default (the stored program does not depend on the dtype
  # beyond its key); each folder here starts cold, so one dtype keeps this test short
  import plugin
  import potentials

  pot = potentials.Potential.create(0, species=["H", "C", "O"], features=8, readout_heads=2)
  atoms = molecule("CH3CH2OH")
  results = []
  for folder in (None, tmp_path, tmp_path):  # plain jit, then traced+stored, then loaded
    if folder is None:
      jax.config.update("jax_compilation_cache_dir", None)
    else:
      plugin.enable_compilation_cache(folder)
    from plugin.registry import COMPILED

    COMPILED.clear("evaluator")  # a fresh evaluator, as in a new process
    a = atoms.copy()
    a.calc = Calculator(pot)
    results.append((a.get_potential_energy(), a.get_forces(), a.calc.results["forces_uncertainty"]))
    assert a.calc.num_compilations == 1
  for e, f, u in results[1:]:
    assert e == results[0][0]
    np.testing.assert_array_equal(f, results[0][1])
    np.testing.assert_array_equal(u, results[0][2])
  assert len(list((tmp_path / "exported").iterdir())) == 1


def _md_runs(folders, atoms, pot, **kw):
  """One ``plugin.md.run`` per folder (None: cache off), each with a fresh engine, as in a new
  process: ``[(final positions, energy, num_compilations)]``."""
  import plugin
  from plugin.md import engine, run

  out = []
  for folder in folders:
    if folder is None:
      jax.config.update("jax_compilation_cache_dir", None)
    else:
      plugin.enable_compilation_cache(folder)
    engine.engine.cache_clear()
    r = run(atoms, pot, **kw)
    out.append((r.atoms.positions, r.atoms.get_potential_energy(), r.num_compilations))
  return out


@pytest.mark.slow  # the calculator test stores and loads programs by default
def test_md_runs_equal_with_stored_programs(tmp_path, restore_jax_cache):
  # the JAX-MD engine's init, observe and chunk programs (neighbour lists and integrator
  # states in and out) are stored on the first cached run and loaded by the next
  from conftest import tiny_molecule_potential

  atoms = molecule("CH3CH2OH")
  kw = dict(total_steps=12, chunk=5, temperature=300.0, seed=1)
  plain, traced, loaded = _md_runs(
    [None, tmp_path, tmp_path], atoms, tiny_molecule_potential(), **kw
  )
  names = sorted(p.name.split("-")[1] for p in (tmp_path / "exported").glob("md-*"))
  assert names == ["chunk", "init", "observe"]
  for pos, energy, compilations in (traced, loaded):
    np.testing.assert_array_equal(pos, plain[0])
    assert energy == plain[1]
    assert compilations == 1  # one chunk program, loaded or traced (a shorter last chunk too)


@pytest.mark.slow
def test_periodic_npt_runs_equal_with_stored_programs(tmp_path, restore_jax_cache):
  # a variable box: its own state type, list rebuilds forced by compression
  from ase.build import bulk

  from conftest import tiny_copper_potential

  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  kw = dict(ensemble="npt", total_steps=6, chunk=3, temperature=300.0, pressure=1.0, seed=2)
  plain, traced, loaded = _md_runs([None, tmp_path, tmp_path], atoms, tiny_copper_potential(), **kw)
  assert len(list((tmp_path / "exported").glob("md-chunk-*"))) == 1
  for pos, energy, _ in (traced, loaded):
    np.testing.assert_allclose(pos, plain[0], rtol=0, atol=1e-12)
    assert energy == plain[1]
