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

Both engines are :mod:`plugin.md`'s: the ASE engine (:mod:`plugin.md.ase_engine`, any ASE
calculator) and the JAX-MD engine (:mod:`plugin.md.engine`, any JAX-MD energy function), so
they start from the same momenta and report temperatures by the same rule (:mod:`plugin.thermo`).

``assert_energy_conserved`` wraps it for test suites. With eqattn installed, pytest gets the
``energy_conservation`` fixture (see :mod:`plugin.pytest_plugin`).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any, Callable, Optional, Sequence

import numpy as np
from ase import Atoms

from plugin import thermo
from plugin.md import guards, output
from plugin.md.ase_engine import run_ase, start_momenta
from plugin.md.ensembles import Params
from plugin.md.settings import DEFAULTS, resolve_dtype

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
  drift: float  # meV/atom/ps
  drift_error: float  # meV/atom/ps, one standard error
  fluctuation: float  # meV/atom, RMS about the fitted line
  mean_temperature: float
  order_ratio: Optional[float] = None  # fluctuation(dt) / fluctuation(dt/2)
  replicas: int = 1  # independent runs; their mean series above, drift_error across them
  replica_drifts: Optional[np.ndarray] = None  # (replicas,) meV/atom/ps

  @property
  def total(self) -> np.ndarray:
    return self.potential + self.kinetic

  def summary(self) -> str:
    runs = (
      f" x {self.replicas} replicas (mean ± standard error across them)"
      if self.replicas > 1
      else ""
    )
    s = (
      f"{self.engine} NVE{runs}, {self.num_atoms} atoms, dt {self.timestep_fs:g} fs, "
      f"{self.time_ps[-1]:.3g} ps (warm-up {self.warmup_ps:g} ps), T0 {self.temperature_K:g} K "
      f"(mean {self.mean_temperature:.1f} K): drift {self.drift:+.4f} ± "
      f"{self.drift_error:.4f} meV/atom/ps, fluctuation {self.fluctuation:.4f} meV/atom"
    )
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
      fit = (
        self.drift * (t - t[0])
        + (self.total[self.time_ps >= self.warmup_ps][0] - self.total[0]) / n * MEV
      )
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
  """``3 N``: the one rule of every reported temperature (:func:`plugin.thermo.degrees_of_freedom`;
  before the redesign this module counted 3N - 3, or 3N - 6 for molecules)."""
  return thermo.degrees_of_freedom(len(atoms))


def _run_ase(
  atoms: Atoms, calculator, timestep_fs: float, steps: int, interval: int, momenta: np.ndarray
):
  """NVE on the ASE engine (:func:`plugin.md.ase_engine.run_ase`): ``(time_ps, epot, ekin)``."""
  result = run_ase(
    atoms,
    calculator,
    ensemble="nve",
    timestep=timestep_fs,
    steps=steps,
    interval=interval,
    momenta=momenta,
  )
  if result.stopped:  # a conservation figure from a cut-short run would mislead
    raise RuntimeError(result.reason)
  log = result.log
  return log.time_ps, log.epot, log.ekin


def _run_jax_md(
  atoms: Atoms,
  energy_fn,
  neighbor_fn,
  shift_fn,
  timestep_fs: float,
  steps: int,
  interval: int,
  momenta: np.ndarray,
  dtype,
):
  """NVE on the JAX-MD engine (:mod:`plugin.md.engine`: chunked jit loop, neighbour update
  inside, an overflow replays the chunk) with the user's functions: ``(time_ps, epot, ekin)``.
  ``momenta (K, N, 3)`` runs ``K`` replicas in one program
  (:func:`plugin.md.replicas.stacked_engine`); ``epot`` and ``ekin`` are then ``(K, rows)``.

  Units: eV, Å, amu, so the time unit is Å sqrt(amu/eV) ≈ 10.18 fs, the same as ASE's
  internal time unit: ASE momenta carry over unchanged and dt = timestep * plugin.thermo.FS.
  """
  import jax.numpy as jnp

  from plugin.md import engine as eng  # here: JAX and JAX-MD only for this engine

  params = Params.from_user(
    timestep=timestep_fs, temperature=0.0, friction=0.0, tau_t=1.0, tau_p=1.0, pressure=0.0
  )
  key = eng.EngineKey(
    ensemble="nve",
    params=params,
    numbers=tuple(int(z) for z in atoms.numbers),
    periodic=False,
    box=tuple(np.eye(3).ravel()),
    dr_threshold=0.0,
    capacity_multiplier=1.0,
    chunk=interval * max(1, DEFAULTS.chunk // interval),
    log_interval=interval,
    traj_interval=0,
  )
  momenta = np.asarray(momenta)
  R, masses = atoms.positions, atoms.get_masses()
  if momenta.ndim == 3:
    from plugin.md import replicas

    engine = replicas.stacked_engine(
      key, energy_fn=energy_fn, neighbor_fn=neighbor_fn, shift_fn=shift_fn
    )
    R, masses = (np.broadcast_to(a, momenta.shape[:1] + a.shape) for a in (R, masses))
  else:
    engine = eng.make_engine(
      key,
      energy_fn=energy_fn,
      neighbor_fn=neighbor_fn,
      displacement_fn=None,
      shift_fn=shift_fn,
      cutoff=0.0,
    )
  carry, extra, known = eng.start(engine, jnp.asarray(R, dtype), np.eye(3), masses, momenta, seed=0)
  columns = output.columns_for(eng.observables(key))
  context = output.RowContext(len(atoms), lambda step: step * timestep_fs)
  logs = [eng.start_logs(engine, carry, 0, known)]
  counts = [1]
  for c in eng.simulate_chunks(engine, carry, 0, steps, extra):
    if c.guard:  # non-finite state: a conservation figure from a cut-short run would mislead
      raise RuntimeError(
        guards.reason(c.guard, c.stop + 1, c.value, max_temperature=np.inf, max_force=np.inf)
      )
    logs.append(c.logs)
    counts.append(c.num_logs)
  series = []
  for k in range(momenta.shape[0] if momenta.ndim == 3 else 1):
    pick = (lambda v: v) if momenta.ndim == 2 else (lambda v: np.asarray(v)[:, k])
    rows = [
      r
      for lg, n in zip(logs, counts)
      for r in output.make_rows(
        columns, {name: (v if name == "step" else pick(v)) for name, v in lg.items()}, n, context
      )
    ]
    series.append(output.MDLog.from_rows(columns, rows))
  if momenta.ndim == 2:
    return series[0].time_ps, series[0].epot, series[0].ekin
  return (series[0].time_ps, np.stack([s.epot for s in series]), np.stack([s.ekin for s in series]))


def jax_md_functions(
  potential, atoms: Atoms, dtype: Any = DEFAULTS.dtype, dr_threshold: float = DEFAULTS.dr_threshold
) -> dict:
  """``energy_fn``, ``neighbor_fn`` and ``shift_fn`` of an eqattn ``potential`` for ``atoms``
  (any periodic cell, in real coordinates, or free space), ready for the JAX-MD path of
  :func:`check_energy_conservation`. Mixed periodicity raises ``ValueError``."""
  import jax.numpy as jnp
  from jax_md import space
  from plugin import jax_md as eq_jax_md

  pbc = np.asarray(atoms.pbc, bool)
  if pbc.any() and not pbc.all():
    raise ValueError(
      f"pbc={pbc.tolist()}: JAX-MD's spaces are periodic along all axes or none; "
      f"give a slab vacuum and make it fully periodic"
    )
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
    potential,
    displacement,
    box,
    atomic_numbers=atoms.numbers,
    dr_threshold=dr_threshold,
    disable_cell_list=not periodic,
    # a model with learnt charges reads the total charge, as the ASE calculator does
    charge=atoms.info.get("charge", 0.0) if potential.config.electrostatics else 0.0,
  )
  return dict(energy_fn=energy_fn, neighbor_fn=neighbor_fn, shift_fn=shift)


def engine_kwargs(
  engine: str,
  potential,
  atoms: Atoms,
  dtype: Any = DEFAULTS.dtype,
  dr_threshold: float = DEFAULTS.dr_threshold,
) -> dict:
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
  temperature: float = DEFAULTS.temperature,
  timestep: float = DEFAULTS.timestep,
  duration: float = DEFAULTS.duration,
  warmup: float = 0.2,
  sample_interval: int = 10,
  check_order: bool = False,
  seed: int = DEFAULTS.seed,
  dtype: Any = None,
  replicas: int = 1,
) -> ConservationReport:
  """Run NVE and measure energy conservation.

  Give either an ASE ``calculator`` (or ``atoms.calc``), or a JAX-MD ``energy_fn(R, neighbor)``
  with its ``neighbor_fn`` (None for a pair-list-free energy), ``shift_fn`` and
  ``displacement_fn`` (the latter unused but kept for symmetry with jax-md's API).
  ``temperature`` in K (initial :func:`plugin.thermo.maxwell_boltzmann` momenta from ``seed``:
  no centre-of-mass motion, for open boundaries no rotation, exactly ``temperature`` by the
  3N rule that ``mean_temperature`` uses too),
  ``timestep`` in fs, ``duration`` and ``warmup`` in ps; energies are sampled every
  ``sample_interval`` steps. ``check_order`` repeats the run at half the timestep.

  ``replicas=K`` runs ``K`` independent copies (momenta from seeds ``seed .. seed + K - 1``; on
  the JAX-MD engine in one compiled program, on the ASE engine one after the other) and
  reports the mean drift over them with the standard error *across* replicas as
  ``drift_error`` (independent runs: an error bar that needs no model of the time
  correlation); ``fluctuation`` and ``mean_temperature`` are replica means, the time series
  the replica-mean energies, ``replica_drifts`` each one's slope.
  """
  del displacement_fn
  if timestep <= 0 or duration <= 0 or warmup < 0 or warmup >= duration:
    raise ValueError("need timestep > 0, duration > 0 and 0 <= warmup < duration")
  if sample_interval < 1:
    raise ValueError("sample_interval must be >= 1")
  if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
    raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
  momenta = np.stack([start_momenta(atoms, temperature, seed + k) for k in range(replicas)])
  if energy_fn is None:
    engine, run = "ase", _ase_runner(atoms, calculator, duration, momenta)
  else:
    if shift_fn is None:
      raise ValueError("a JAX-MD energy_fn needs its shift_fn")
    engine = "jax-md"
    run = _jax_md_runner(atoms, energy_fn, neighbor_fn, shift_fn, duration, momenta, dtype)
  n = len(atoms)

  def figures(t, epot, ekin):
    """Per replica: ``(slope, error, rms)`` rows."""
    keep = t >= warmup
    return np.array([drift_statistics(t[keep], (ep + ek)[keep] / n) for ep, ek in zip(epot, ekin)])

  t, epot, ekin = run(timestep, sample_interval)
  fig = figures(t, epot, ekin)
  slope, rms = float(np.mean(fig[:, 0])), float(np.mean(fig[:, 2]))
  err = (
    float(fig[0, 1]) if replicas == 1 else float(np.std(fig[:, 0], ddof=1) / math.sqrt(replicas))
  )
  mean_t = float(np.mean(thermo.temperature_from_kinetic(ekin, n)))
  ratio = None
  if check_order:
    rms2 = float(np.mean(figures(*run(timestep / 2, 2 * sample_interval))[:, 2]))
    ratio = rms / rms2 if rms2 > 0 else float("inf")
  return ConservationReport(
    engine,
    n,
    timestep,
    temperature,
    t,
    epot.mean(0),
    ekin.mean(0),
    warmup,
    slope,
    err,
    rms,
    mean_t,
    ratio,
    replicas=replicas,
    replica_drifts=fig[:, 0],
  )


def _ase_runner(atoms: Atoms, calculator, duration: float, momenta: np.ndarray) -> Callable:
  """``run(dt, interval) -> (t, epot (K, T), ekin (K, T))``: the replicas one after the other
  with ASE's velocity Verlet and ``calculator`` (default ``atoms.calc``)."""
  calculator = calculator if calculator is not None else atoms.calc
  if calculator is None:
    raise ValueError("give an ASE calculator (or atoms with one attached) or a JAX-MD energy_fn")

  def run(dt, interval):
    steps = int(round(duration * 1000.0 / dt))
    runs = [_run_ase(atoms, calculator, dt, steps, interval, p) for p in momenta]
    return runs[0][0], np.stack([r[1] for r in runs]), np.stack([r[2] for r in runs])

  return run


def _jax_md_runner(atoms, energy_fn, neighbor_fn, shift_fn, duration, momenta, dtype) -> Callable:
  """``run(dt, interval) -> (t, epot (K, T), ekin (K, T))``: the replicas in one JAX-MD
  program."""
  replicas, dt_ = len(momenta), resolve_dtype(dtype)

  def run(dt, interval):
    steps = int(round(duration * 1000.0 / dt))
    steps -= steps % interval
    t, epot, ekin = _run_jax_md(
      atoms,
      energy_fn,
      neighbor_fn,
      shift_fn,
      dt,
      steps,
      interval,
      momenta if replicas > 1 else momenta[0],
      dt_,
    )
    return t, np.reshape(epot, (replicas, -1)), np.reshape(ekin, (replicas, -1))

  return run


def assert_energy_conserved(
  atoms: Atoms,
  calculator: Any = None,
  *,
  max_drift: float = 0.5,
  max_fluctuation: Optional[float] = None,
  order_range: Optional[Sequence[float]] = None,
  plot: Optional[str] = None,
  **kwargs,
) -> ConservationReport:
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
    problems.append(
      f"|drift| + 2 sigma = {abs(report.drift) + 2 * report.drift_error:.4f} > "
      f"{max_drift} meV/atom/ps"
    )
  if max_fluctuation is not None and report.fluctuation > max_fluctuation:
    problems.append(f"fluctuation {report.fluctuation:.4f} > {max_fluctuation} meV/atom")
  if order_range is not None and not order_range[0] <= report.order_ratio <= order_range[1]:
    problems.append(f"dt-halving ratio {report.order_ratio:.2f} outside {tuple(order_range)}")
  if not np.all(np.isfinite(report.total)):
    problems.append("energies became non-finite")
  if problems:
    raise AssertionError("energy not conserved: " + "; ".join(problems) + "\n" + report.summary())
  return report
