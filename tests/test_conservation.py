"""Energy-conservation regression suite on the shipped models (plugin.testing).

Short runs are in the default selection; the long ones (>= 20 ps) are marked slow:
``python3 -m pytest -m slow tests/test_conservation.py``.
"""

import pytest
from ase.build import bulk, molecule

import potentials
from plugin import testing


@pytest.fixture(scope="module")
def ethanol_model():
  return potentials.load("ethanol")


@pytest.fixture(scope="module")
def copper_model():
  return potentials.load("copper")


def copper_cell():
  """108 atoms: the smallest cubic FCC cell wider than 2 x (4.5 Å cutoff + 0.5 Å skin)."""
  return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)


# one engine per system by default (each engine conserves on one), both with -m slow
@pytest.mark.parametrize("engine", ["ase", pytest.param("jax-md", marks=pytest.mark.slow)])
def test_ethanol_short(ethanol_model, engine):
  atoms = molecule("CH3CH2OH")
  report = testing.assert_energy_conserved(
    atoms,
    temperature=300,
    timestep=0.5,
    duration=0.5,
    warmup=0.05,
    max_drift=0.5,
    **testing.engine_kwargs(engine, ethanol_model, atoms),
  )
  assert report.engine == engine and report.fluctuation < 0.5


@pytest.mark.parametrize("engine", [pytest.param("ase", marks=pytest.mark.slow), "jax-md"])
def test_copper_short(copper_model, engine):
  # 600 K, 2 fs, periodic: atoms cross the 0.25 Å half-skin within the run, so lists rebuild
  atoms = copper_cell()
  report = testing.assert_energy_conserved(
    atoms,
    temperature=600,
    timestep=2.0,
    duration=0.2,
    warmup=0.02,
    max_drift=0.5,
    **testing.engine_kwargs(engine, copper_model, atoms),
  )
  assert report.fluctuation < 0.5 and 200 < report.mean_temperature < 500  # ~T0/2: equipartition


# long runs: system -> (structure, initial temperature K, timestep fs, sample interval,
# float64 warm-up ps)
LONG = {
  "ethanol": (lambda: molecule("CH3CH2OH"), 300, 0.5, 20, 0.1),
  "copper": (copper_cell, 600, 2.0, 10, 0.2),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
@pytest.mark.parametrize("system", list(LONG))
def test_long_float32(system, engine):
  make, temperature, timestep, interval, _ = LONG[system]
  atoms = make()
  testing.assert_energy_conserved(
    atoms,
    temperature=temperature,
    timestep=timestep,
    duration=20.0,
    warmup=1.0,
    sample_interval=interval,
    max_drift=0.05,
    **testing.engine_kwargs(engine, potentials.load(system), atoms),
  )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ase", "jax-md"])
@pytest.mark.parametrize("system", list(LONG))
def test_order_float64(system, engine):
  import jax

  if not jax.config.jax_enable_x64:
    pytest.skip("needs x64")
  make, temperature, timestep, _, warmup = LONG[system]
  atoms = make()
  testing.assert_energy_conserved(
    atoms,
    temperature=temperature,
    timestep=timestep,
    duration=2.0,
    warmup=warmup,
    max_drift=0.5,
    order_range=(3.5, 4.5),
    **testing.engine_kwargs(engine, potentials.load(system), atoms, "float64"),
  )
