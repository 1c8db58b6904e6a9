"""Energy-conservation regression suite on the shipped models (plugin.testing).

Short runs are in the default selection; the long ones (>= 20 ps) are marked slow:
``python3 -m pytest -m slow tests/test_conservation.py``.
"""

import jax.numpy as jnp
import pytest
from ase.build import bulk, molecule

import potentials
from plugin import testing
from plugin.ase import Calculator


@pytest.fixture(scope="module")
def ethanol_model():
  return potentials.load("ethanol")


@pytest.fixture(scope="module")
def copper_model():
  return potentials.load("copper")


def copper_cell():
  """108 atoms: the smallest cubic FCC cell wider than 2 x (4.5 Å cutoff + 0.5 Å skin)."""
  return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)


def _engine_args(engine, pot, atoms, dtype="float32"):
  if engine == "ase":
    return dict(calculator=Calculator(pot, dtype=dtype))
  return dict(dtype=jnp.dtype(dtype), **testing.jax_md_functions(pot, atoms, dtype))


def test_ethanol_ase_short(ethanol_model):
  atoms = molecule("CH3CH2OH")
  report = testing.assert_energy_conserved(atoms, Calculator(ethanol_model), temperature=300,
                                           timestep=0.5, duration=0.5, warmup=0.05,
                                           max_drift=0.5)
  assert report.fluctuation < 0.5


def test_ethanol_jax_md_short(ethanol_model):
  atoms = molecule("CH3CH2OH")
  report = testing.assert_energy_conserved(atoms, temperature=300, timestep=0.5, duration=0.5,
                                           warmup=0.05, max_drift=0.5, dtype=jnp.float32,
                                           **testing.jax_md_functions(ethanol_model, atoms))
  assert report.engine == "jax-md"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
def test_ethanol_long_float32(ethanol_model, engine):
  atoms = molecule("CH3CH2OH")
  testing.assert_energy_conserved(atoms, temperature=300, timestep=0.5, duration=20.0,
                                  warmup=1.0, sample_interval=20, max_drift=0.05,
                                  **_engine_args(engine, ethanol_model, atoms))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
def test_ethanol_order_float64(ethanol_model, engine):
  import jax
  if not jax.config.jax_enable_x64:
    pytest.skip("needs x64")
  atoms = molecule("CH3CH2OH")
  testing.assert_energy_conserved(atoms, temperature=300, timestep=0.5, duration=2.0,
                                  warmup=0.1, max_drift=0.5, order_range=(3.5, 4.5),
                                  **_engine_args(engine, ethanol_model, atoms, "float64"))


@pytest.mark.parametrize("engine", ["ase", "jax-md"])
def test_copper_short(copper_model, engine):
  # 600 K, 2 fs, periodic: atoms cross the 0.25 Å half-skin within the run, so lists rebuild
  atoms = copper_cell()
  report = testing.assert_energy_conserved(atoms, temperature=600, timestep=2.0, duration=0.4,
                                           warmup=0.04, max_drift=0.5,
                                           **_engine_args(engine, copper_model, atoms))
  assert report.fluctuation < 0.5 and 200 < report.mean_temperature < 500  # ~T0/2: equipartition


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
def test_copper_long_float32(copper_model, engine):
  atoms = copper_cell()
  testing.assert_energy_conserved(atoms, temperature=600, timestep=2.0, duration=20.0,
                                  warmup=1.0, sample_interval=10, max_drift=0.05,
                                  **_engine_args(engine, copper_model, atoms))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
def test_copper_order_float64(copper_model, engine):
  import jax
  if not jax.config.jax_enable_x64:
    pytest.skip("needs x64")
  atoms = copper_cell()
  testing.assert_energy_conserved(atoms, temperature=600, timestep=2.0, duration=2.0,
                                  warmup=0.2, max_drift=0.5, order_range=(3.5, 4.5),
                                  **_engine_args(engine, copper_model, atoms, "float64"))
