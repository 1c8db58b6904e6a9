"""Tests for plugin.thermo: units, kinetic energy, the one temperature rule, Maxwell-Boltzmann."""

import ase
import ase.build
import ase.units
import numpy as np
import pytest
from jax_md import units as jmd_units

from plugin import thermo


def test_unit_conversions():
  # ASE's constants (the one source) agree with JAX-MD's metal system (which rounds to float32
  # without x64): both use CODATA 2014 and the time unit Å sqrt(amu/eV).
  u = jmd_units.metal_unit_system()
  assert thermo.FS == pytest.approx(float(u["time"]) * 1e-3, rel=1e-6)
  assert thermo.KB == pytest.approx(float(u["temperature"]), rel=1e-6)
  assert thermo.BAR == pytest.approx(float(u["pressure"]), rel=1e-6)
  assert thermo.FS == pytest.approx(ase.units.fs, rel=1e-12)
  assert thermo.KB == pytest.approx(ase.units.kB, rel=1e-12)
  assert thermo.BAR == pytest.approx(ase.units.bar, rel=1e-12)
  print(
    f"1 fs = {thermo.FS:.9g} metal time units ({1 / thermo.FS:.6g} fs per unit); "
    f"kB = {thermo.KB:.9g} eV/K; 1 bar = {thermo.BAR:.9g} eV/Å^3"
  )


def test_kinetic_energy_and_temperature_formulas():
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  atoms.set_masses(np.linspace(50.0, 70.0, len(atoms)))
  rng = np.random.default_rng(1)
  atoms.set_momenta(rng.normal(size=(len(atoms), 3)))
  p, m = atoms.get_momenta(), atoms.get_masses()
  assert thermo.kinetic_energy(p, m) == pytest.approx(atoms.get_kinetic_energy(), rel=1e-12)
  # the one rule, 3N degrees of freedom, is ASE's Atoms.get_temperature
  assert thermo.degrees_of_freedom(len(atoms)) == 3 * len(atoms)
  assert thermo.temperature(p, m) == pytest.approx(atoms.get_temperature(), rel=1e-9)
  assert thermo.temperature_from_kinetic(atoms.get_kinetic_energy(), len(atoms)) == (
    pytest.approx(atoms.get_temperature(), rel=1e-9)
  )


def test_maxwell_boltzmann_start():
  m = np.linspace(50.0, 70.0, 500)
  p = thermo.maxwell_boltzmann(m, 300.0, seed=3)
  assert thermo.temperature(p, m) == pytest.approx(300.0, rel=1e-12)
  np.testing.assert_allclose(p.sum(axis=0), 0.0, atol=1e-10)
  # per-component variance m kT: the distribution, not only its mean, is right
  np.testing.assert_allclose(np.var(p / np.sqrt(m)[:, None]), thermo.KB * 300.0, rtol=0.1)
  assert not np.allclose(p, thermo.maxwell_boltzmann(m, 300.0, seed=4))
  np.testing.assert_array_equal(p, thermo.maxwell_boltzmann(m, 300.0, seed=3))


@pytest.mark.parametrize("name", ["CH3CH2OH", "CO2"])  # CO2: linear, singular inertia
def test_maxwell_boltzmann_without_rotation_for_molecules(name):
  from ase.build import molecule

  mol = molecule(name)
  m, x = mol.get_masses(), mol.positions
  p = thermo.maxwell_boltzmann(m, 300.0, seed=0, positions=x)
  assert thermo.temperature(p, m) == pytest.approx(300.0, rel=1e-12)
  np.testing.assert_allclose(p.sum(axis=0), 0.0, atol=1e-12)
  com = (m[:, None] * x).sum(axis=0) / m.sum()
  angular = np.cross(x - com, p).sum(axis=0)
  assert np.abs(angular).max() < 1e-10 * np.abs(np.cross(x - com, p)).max()
  # without positions the same draw keeps its rotation
  q = thermo.maxwell_boltzmann(m, 300.0, seed=0)
  assert np.abs(np.cross(x - com, q).sum(axis=0)).max() > 1e-3
