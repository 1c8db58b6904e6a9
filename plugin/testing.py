"""Energy-conservation checks for any ASE calculator or JAX-MD energy function.

``check_energy_conservation`` runs NVE (velocity Verlet) from a structure at a temperature and
measures how well the total energy is conserved:

* **drift**: slope of the total energy per atom against time after a warm-up, in
  meV/atom/ps, with a standard error that accounts for correlated fluctuations (block
  averaging of the residuals), the metric LAMBench reports (its tolerance: 0.5 meV/atom/ps);
* **fluctuation**: RMS of the total energy per atom about that line (meV/atom);
* optionally the **integrator order**: the fluctuation ratio when the timestep halves (about 4
  for velocity Verlet with smooth conservative forces; about 2 or less points at forces that
  are not the gradient of the energy, discontinuities at the cutoff or neighbour-list errors).

``assert_energy_conserved`` wraps it for test suites. With eqattn installed, pytest gets the
``energy_conservation`` fixture (see :mod:`plugin.pytest_plugin`).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any, Callable, Optional, Sequence

import numpy as np
from ase import Atoms, units

MEV = 1000.0


@dataclasses.dataclass
class ConservationReport:
  """Figures and time series of one NVE run (energies in eV, times in ps)."""
  engine: str
  num_atoms: int
  timestep_fs: float
  temperature_K: float
  time_ps: np.ndarray
  potential: np.ndarray
  kinetic: np.ndarray
  warmup_ps: float
  drift: float            # meV/atom/ps
  drift_error: float      # meV/atom/ps, one standard error
  fluctuation: float      # meV/atom, RMS about the fitted line
  mean_temperature: float
  order_ratio: Optional[float] = None   # fluctuation(dt) / fluctuation(dt/2)

  @property
  def total(self) -> np.ndarray:
    return self.potential + self.kinetic

  def summary(self) -> str:
    s = (f"{self.engine} NVE, {self.num_atoms} atoms, dt {self.timestep_fs:g} fs, "
         f"{self.time_ps[-1]:.3g} ps (warm-up {self.warmup_ps:g} ps), T0 {self.temperature_K:g} K "
         f"(mean {self.mean_temperature:.1f} K): drift {self.drift:+.4f} ± "
         f"{self.drift_error:.4f} meV/atom/ps, fluctuation {self.fluctuation:.4f} meV/atom")
    if self.order_ratio is not None:
      s += f", dt-halving fluctuation ratio {self.order_ratio:.2f}"
    return s

  def plot(self, path: str) -> None:
    """PNG of total, potential and kinetic energy (meV/atom, relative to t=0) vs time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = self.num_atoms
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    axes[0].plot(self.time_ps, (self.total - self.total[0]) / n * MEV, label="total")
    t = self.time_ps[self.time_ps >= self.warmup_ps]
    if len(t):
      fit = (self.drift * (t - t[0]) + (self.total[self.time_ps >= self.warmup_ps][0]
                                         - self.total[0]) / n * MEV)
      axes[0].plot(t, fit, "k--", lw=1, label=f"drift {self.drift:+.3g} meV/atom/ps")
    axes[0].set_ylabel("ΔE_total (meV/atom)")
    axes[0].legend()
    axes[1].plot(self.time_ps, (self.potential - self.potential[0]) / n * MEV, label="potential")
    axes[1].plot(self.time_ps, (self.kinetic - self.kinetic[0]) / n * MEV, label="kinetic")
    axes[1].set_xlabel("time (ps)")
    axes[1].set_ylabel("ΔE (meV/atom)")
    axes[1].legend()
    fig.suptitle(textwrap.fill(self.summary(), 110), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def drift_statistics(time_ps: np.ndarray, energy_per_atom: np.ndarray):
  """Slope (meV/atom/ps), its standard error and the RMS residual (meV/atom).

  The standard error comes from block averages of the residuals (blocks of growing size until
  the estimate stops growing), so correlated fluctuations do not make it look too small.
  """
  t = np.asarray(time_ps, np.float64)
  e = np.asarray(energy_per_atom, np.float64) * MEV
  if len(t) < 3:
    raise ValueError("need at least 3 samples after the warm-up to fit a drift")
  tc = t - t.mean()
  slope = float(np.sum(tc * (e - e.mean())) / np.sum(tc * tc))
  resid = e - e.mean() - slope * tc
  rms = float(np.sqrt(np.mean(resid**2)))
  # effective variance of the residual noise from block averaging
  var_eff = np.var(resid)
  size = 1
  while len(resid) // (2 * size) >= 4:
    size *= 2
    nb = len(resid) // size
    blocks = resid[: nb * size].reshape(nb, size).mean(axis=1)
    var_eff = max(var_eff, np.var(blocks) * size)
  err = float(math.sqrt(var_eff / np.sum(tc * tc)))
  return slope, err, rms


# ----------------------------------------------------------------------------- engines
def degrees_of_freedom(atoms: Atoms) -> int:
  """3N minus the conserved centre-of-mass (and, for molecules, rotational) motion."""
  n = len(atoms)
  if np.any(atoms.pbc) or n == 1:
    return max(3 * n - 3, 1)
  return max(3 * n - (5 if n == 2 else 6), 1)


def _initial_velocities(atoms: Atoms, temperature: float, seed: int) -> np.ndarray:
  """Maxwell-Boltzmann velocities without net momentum (and rotation for molecules), scaled so
  the kinetic energy is exactly dof/2 kB T."""
  from ase.md import velocitydistribution as vd

  a = atoms.copy()
  # ASE >= 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta
  thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
  thermalize(a, temperature_K=temperature, rng=np.random.default_rng(seed))
  Stationary, ZeroRotation = vd.Stationary, vd.ZeroRotation
  Stationary(a)
  if not np.any(a.pbc) and len(a) > 1:
    ZeroRotation(a)
  ke = a.get_kinetic_energy()
  if ke > 0:
    a.set_velocities(a.get_velocities() * math.sqrt(
        0.5 * degrees_of_freedom(a) * units.kB * temperature / ke))
  return a.get_velocities()


def _run_ase(atoms: Atoms, calculator, timestep_fs: float, steps: int, interval: int,
             velocities: np.ndarray):
  from ase.md.verlet import VelocityVerlet

  a = atoms.copy()
  a.calc = calculator
  a.set_velocities(velocities)
  dyn = VelocityVerlet(a, timestep=timestep_fs * units.fs)
  t, epot, ekin = [], [], []

  def record():
    now = dyn.get_number_of_steps() * timestep_fs / 1000.0
    if t and t[-1] == now:  # ASE versions differ in calling observers at the start/end of run()
      return
    t.append(now)
    epot.append(a.get_potential_energy())
    ekin.append(a.get_kinetic_energy())
  record()
  dyn.attach(record, interval=interval)
  dyn.run(steps)
  return np.array(t), np.array(epot), np.array(ekin)


def _run_jax_md(atoms: Atoms, energy_fn, neighbor_fn, displacement_fn, shift_fn,
                timestep_fs: float, steps: int, interval: int, velocities: np.ndarray, dtype):
  """NVE with jax-md (chunked jit loop, neighbour update inside, overflow replays the chunk).

  Units: eV, Å, amu, so the time unit is Å sqrt(amu/eV) ≈ 10.18 fs, the same as ASE's
  internal time unit: ASE velocities carry over unchanged and dt = timestep * ase.units.fs.
  """
  import jax
  import jax.numpy as jnp
  from jax_md import simulate

  dt = timestep_fs * units.fs
  mass = jnp.asarray(atoms.get_masses(), dtype)[:, None]
  R = jnp.asarray(atoms.positions, dtype)
  nbrs = neighbor_fn.allocate(R) if neighbor_fn is not None else None
  init, apply = simulate.nve(energy_fn, shift_fn, dt)
  kw = {"neighbor": nbrs} if nbrs is not None else {}
  state = init(jax.random.PRNGKey(0), R, kT=0.0, mass=mass, **kw)  # momenta replaced below
  state = state.set(momentum=jnp.asarray(velocities, dtype) * mass)

  def energies(state, nbrs):
    kw = {"neighbor": nbrs} if nbrs is not None else {}
    # not quantity.kinetic_energy: its float64 sum warns in float32 runs
    return energy_fn(state.position, **kw), 0.5 * jnp.sum(state.momentum**2 / state.mass)

  @jax.jit
  def chunk(state, nbrs):
    def body(_, carry):
      state, nbrs = carry
      # keep the run's dtype: a user's float64 box or shift under x64 would promote the state
      keep = lambda new: jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, state)
      if nbrs is not None:
        nbrs = nbrs.update(state.position)
        return keep(apply(state, neighbor=nbrs)), nbrs
      return keep(apply(state)), nbrs
    state, nbrs = jax.lax.fori_loop(0, interval, body, (state, nbrs))
    return state, nbrs, energies(state, nbrs)

  e0 = jax.jit(energies)(state, nbrs)
  t, epot, ekin = [0.0], [float(e0[0])], [float(e0[1])]
  done = extra = 0
  while done < steps:
    saved = (state, nbrs)
    state, new_nbrs, (ep, ek) = chunk(state, nbrs)
    if new_nbrs is not None and bool(new_nbrs.did_buffer_overflow):
      # replay the chunk with a larger list: no step uses a truncated neighbour list. More
      # room each time: the chunk's start positions alone may give the list that overflowed.
      state, nbrs = saved
      extra += 1
      nbrs = neighbor_fn.allocate(state.position, extra)
      continue
    nbrs = new_nbrs
    done += interval
    t.append(done * timestep_fs / 1000.0)
    epot.append(float(ep))
    ekin.append(float(ek))
  return np.array(t), np.array(epot), np.array(ekin)


def jax_md_functions(potential, atoms: Atoms, dtype: Any = "float32",
                     dr_threshold: float = 0.5) -> dict:
  """``energy_fn``, ``neighbor_fn`` and ``shift_fn`` of an eqattn ``potential`` for ``atoms``
  (any periodic cell, in real coordinates, or free space), ready for the JAX-MD path of
  :func:`check_energy_conservation`. Mixed periodicity raises ``ValueError``."""
  import jax.numpy as jnp
  from jax_md import space
  from plugin import jax_md as eq_jax_md
  pbc = np.asarray(atoms.pbc, bool)
  if pbc.any() and not pbc.all():
    raise ValueError(f"pbc={pbc.tolist()}: JAX-MD's spaces are periodic along all axes or none; "
                     f"give a slab vacuum and make it fully periodic")
  periodic = bool(pbc.all())
  cell = atoms.cell.array
  if periodic and np.allclose(cell, np.diag(np.diag(cell))):
    # orthorhombic: space.periodic wraps exactly; periodic_general's real-to-fractional round
    # trip each step makes float32 NVE drift ~50x more (108 Cu atoms, 2 fs, 20 ps)
    box = jnp.asarray(np.diag(cell), dtype)
    displacement, shift = space.periodic(box)
  elif periodic:
    box = jnp.asarray(cell.T, dtype)  # lattice vectors as columns
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
  else:
    box = 100.0  # free space: only the region of JAX-MD's cell list
    displacement, shift = space.free()
  neighbor_fn, energy_fn = eq_jax_md.neighbor_list(
      potential, displacement, box, species=atoms.numbers, dr_threshold=dr_threshold,
      disable_cell_list=not periodic)
  return dict(energy_fn=energy_fn, neighbor_fn=neighbor_fn, shift_fn=shift)


def engine_kwargs(engine: str, potential, atoms: Atoms, dtype: Any = "float32",
                  dr_threshold: float = 0.5) -> dict:
  """Keyword arguments of :func:`check_energy_conservation` that run an eqattn ``potential``
  with ``engine`` ``"ase"`` (:class:`plugin.ase.Calculator`) or ``"jax-md"``
  (:func:`jax_md_functions`) in ``dtype``."""
  if engine == "ase":
    from plugin.ase import Calculator
    return dict(calculator=Calculator(potential, dtype=dtype))
  if engine == "jax-md":
    return dict(dtype=np.dtype(dtype), **jax_md_functions(potential, atoms, dtype, dr_threshold))
  raise ValueError(f"engine must be 'ase' or 'jax-md', got {engine!r}")


def check_energy_conservation(
    atoms: Atoms,
    calculator: Any = None,
    *,
    energy_fn: Optional[Callable] = None,
    neighbor_fn: Any = None,
    displacement_fn: Optional[Callable] = None,
    shift_fn: Optional[Callable] = None,
    temperature: float = 300.0,
    timestep: float = 0.5,
    duration: float = 2.0,
    warmup: float = 0.2,
    sample_interval: int = 10,
    check_order: bool = False,
    seed: int = 0,
    dtype: Any = None,
) -> ConservationReport:
  """Run NVE and measure energy conservation.

  Give either an ASE ``calculator`` (or ``atoms.calc``), or a JAX-MD ``energy_fn(R, neighbor)``
  with its ``neighbor_fn`` (None for a pair-list-free energy), ``shift_fn`` and
  ``displacement_fn`` (the latter unused but kept for symmetry with jax-md's API).
  ``temperature`` in K (initial Maxwell-Boltzmann velocities, fixed ``seed``, zero momentum),
  ``timestep`` in fs, ``duration`` and ``warmup`` in ps; energies are sampled every
  ``sample_interval`` steps. ``check_order`` repeats the run at half the timestep.
  """
  del displacement_fn
  if timestep <= 0 or duration <= 0 or warmup < 0 or warmup >= duration:
    raise ValueError("need timestep > 0, duration > 0 and 0 <= warmup < duration")
  if sample_interval < 1:
    raise ValueError("sample_interval must be >= 1")
  velocities = _initial_velocities(atoms, temperature, seed)
  if energy_fn is None:
    calculator = calculator if calculator is not None else atoms.calc
    if calculator is None:
      raise ValueError("give an ASE calculator (or atoms with one attached) or a JAX-MD energy_fn")
    engine = "ase"

    def run(dt, interval):
      steps = int(round(duration * 1000.0 / dt))
      return _run_ase(atoms, calculator, dt, steps, interval, velocities)
  else:
    if shift_fn is None:
      raise ValueError("a JAX-MD energy_fn needs its shift_fn")
    import jax.numpy as jnp
    engine = "jax-md"
    dt_ = dtype or (jnp.float64 if __import__("jax").config.jax_enable_x64 else jnp.float32)

    def run(dt, interval):
      steps = int(round(duration * 1000.0 / dt))
      steps -= steps % interval
      return _run_jax_md(atoms, energy_fn, neighbor_fn, None, shift_fn, dt, steps, interval,
                         velocities, dt_)

  t, epot, ekin = run(timestep, sample_interval)
  n = len(atoms)
  keep = t >= warmup
  slope, err, rms = drift_statistics(t[keep], (epot + ekin)[keep] / n)
  mean_t = float(np.mean(2 * ekin / (degrees_of_freedom(atoms) * units.kB)))
  ratio = None
  if check_order:
    t2, ep2, ek2 = run(timestep / 2, 2 * sample_interval)
    keep2 = t2 >= warmup
    _, _, rms2 = drift_statistics(t2[keep2], (ep2 + ek2)[keep2] / n)
    ratio = rms / rms2 if rms2 > 0 else float("inf")
  return ConservationReport(engine, n, timestep, temperature, t, epot, ekin, warmup, slope, err,
                            rms, mean_t, ratio)


def assert_energy_conserved(atoms: Atoms, calculator: Any = None, *, max_drift: float = 0.5,
                            max_fluctuation: Optional[float] = None,
                            order_range: Optional[Sequence[float]] = None,
                            plot: Optional[str] = None, **kwargs) -> ConservationReport:
  """Fail (AssertionError with the figures) unless energy is conserved.

  ``max_drift`` bounds ``|drift| + 2 * drift_error`` in meV/atom/ps (default: LAMBench's 0.5);
  ``max_fluctuation`` the RMS fluctuation in meV/atom; ``order_range=(lo, hi)`` the
  dt-halving fluctuation ratio (runs the check at half the timestep). Other keywords go to
  :func:`check_energy_conservation`; ``plot`` writes a PNG of the run.
  """
  if order_range is not None:
    kwargs["check_order"] = True
  report = check_energy_conservation(atoms, calculator, **kwargs)
  if plot:
    report.plot(plot)
  problems = []
  if abs(report.drift) + 2 * report.drift_error > max_drift:
    problems.append(f"|drift| + 2 sigma = {abs(report.drift) + 2 * report.drift_error:.4f} > "
                    f"{max_drift} meV/atom/ps")
  if max_fluctuation is not None and report.fluctuation > max_fluctuation:
    problems.append(f"fluctuation {report.fluctuation:.4f} > {max_fluctuation} meV/atom")
  if order_range is not None and not order_range[0] <= report.order_ratio <= order_range[1]:
    problems.append(f"dt-halving ratio {report.order_ratio:.2f} outside {tuple(order_range)}")
  if not np.all(np.isfinite(report.total)):
    problems.append("energies became non-finite")
  if problems:
    raise AssertionError("energy not conserved: " + "; ".join(problems) + "\n" + report.summary())
  return report
