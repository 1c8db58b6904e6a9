"""Trajectory formats of plugin.md (.traj, .extxyz, .h5 H5MD): each written, read back, resumed;
a run killed with SIGKILL between frames (in a subprocess) reads back to its last complete frame
and resumes; a frame cut short is never read back. conftest enables float64."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import ase.build
import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_copper_potential

import plugin.md as md
from plugin.md import output

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Nose-Hoover: its chain variables (md_state) must survive every format for an exact resume.
KW = dict(
  ensemble="nvt_nose_hoover",
  temperature=300.0,
  timestep=1.0,
  chunk=20,
  log_interval=10,
  dr_threshold=0.2,
  dtype=jnp.float64,
  seed=0,
)
STEPS, CUT = 60, 40
FORMATS = ["traj", "extxyz", "h5"]
# extxyz stores 8 decimals: a resumed run starts 1e-8 away and (chaos) drifts a little further
TOLERANCE = {"traj": 1e-9, "extxyz": 1e-5, "h5": 1e-9}


def cu32() -> ase.Atoms:
  atoms = ase.build.bulk("Cu", "fcc", a=3.4, cubic=True).repeat(2)
  atoms.rattle(0.15, seed=0)
  return atoms


@pytest.fixture(scope="module")
def pot():
  return tiny_copper_potential(3.0)


@pytest.fixture(scope="module")
def straight(pot, tmp_path_factory):
  """The run the interrupted ones must reproduce: STEPS steps in one go (.traj)."""
  path = tmp_path_factory.mktemp("straight") / "straight.traj"
  result = md.run(cu32(), pot, total_steps=STEPS, traj=path, **KW)
  return result, output.read_trajectory(path)


def steps_of(frames):
  return [int(f.info["md_step"]) for f in frames]


# ------------------------------------------------------------------------------------------
# the formats table (no MD)


def test_format_by_extension_and_clear_errors(monkeypatch):
  for name, fmt in output.FORMATS.items():
    for suffix in fmt.suffixes:
      assert output.traj_format(f"run{suffix.upper()}").name == name
  with pytest.raises(ValueError, match=r"\.traj.*\.extxyz.*\.h5md"):
    output.traj_format("run.dcd")
  monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
  with pytest.raises(ImportError, match=r"pip install h5py.*eqattn\[h5\]"):
    output.traj_format("run.h5")


def test_integrator_state_survives_the_text_token():
  state = {
    ".chain.position": np.array([0.1, -2.5e-17, 3.0]),
    ".key": np.array([7, 2**32 - 1], np.uint32),
    ".chain.tau": np.array(12.5),
  }
  token = output.encode_state(state)
  assert token.replace("-", "").replace("_", "").isalnum()  # fits an extxyz comment line
  back = output.decode_state(token)
  assert list(back) == list(state)
  for k in state:
    assert back[k].dtype == state[k].dtype
    np.testing.assert_array_equal(back[k], state[k])
  assert output.encode_state({}) == "" and output.decode_state("") is None


def test_signals_wait_until_the_frame_is_written():
  done = []
  # Python's Ctrl-C handler, whatever the runner set (pytest-xdist workers ignore SIGINT)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  # another live thread (as JAX and xdist have) may be the one the kernel hands the signal to
  release = threading.Event()
  other = threading.Thread(target=release.wait, daemon=True)
  other.start()
  try:
    with pytest.raises(KeyboardInterrupt):
      with output._signals_held():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of writing a frame
        done.append("frame")  # still runs: the signal is held
  finally:
    signal.signal(signal.SIGINT, previous)
    release.set()
  assert done == ["frame"]


# ------------------------------------------------------------------------------------------
# each format: written, read back, resumed


def check_h5md_layout(path, frames):
  h5py = pytest.importorskip("h5py")
  with h5py.File(path, "r") as f:
    assert list(f["h5md"].attrs["version"]) == [1, 1]
    part = f["particles/all"]
    n = len(frames)
    for element in ("position", "velocity", "force"):
      ds = part[element]["value"]
      assert ds.shape == (n, 32, 3) and ds.maxshape[0] is None
      assert ds.chunks is not None and ds.compression == "gzip"
      assert part[element]["step"] == part["position/step"]  # one shared step dataset
    assert part[element]["value"].attrs["unit"] == "eV angstrom-1"
    assert list(part["box"].attrs["boundary"]) == [b"periodic"] * 3
    assert part["box/edges/value"].shape == (n, 3, 3)
    np.testing.assert_array_equal(part["species"][()], frames[0].numbers)
    np.testing.assert_array_equal(part["position/step"][()], steps_of(frames))
    np.testing.assert_allclose(part["position/value"][-1], frames[-1].positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
      part["velocity/value"][-1] / md.FS, frames[-1].get_velocities(), rtol=1e-12
    )
    np.testing.assert_allclose(
      f["observables/potential_energy/value"][()],
      [a.get_potential_energy() for a in frames],
      rtol=1e-12,
    )
    assert f["observables/stress/value"].shape == (n, 6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_written_read_back_and_resumed(pot, straight, tmp_path, fmt):
  ref, ref_frames = straight
  path = tmp_path / f"run.{fmt}"
  first = md.run(cu32(), pot, total_steps=CUT, traj=path, **KW)
  frames = md.read_trajectory(path)
  assert steps_of(frames) == list(range(0, CUT + 1, 10))
  last, want = frames[-1], first.atoms
  tol = TOLERANCE[fmt]
  np.testing.assert_allclose(last.positions, want.positions, rtol=0, atol=tol)
  np.testing.assert_allclose(last.get_momenta(), want.get_momenta(), rtol=0, atol=tol)
  np.testing.assert_allclose(last.cell.array, want.cell.array, atol=1e-8)
  assert last.get_potential_energy() == pytest.approx(want.get_potential_energy(), abs=1e-6)
  np.testing.assert_allclose(last.get_forces(), want.get_forces(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(last.get_stress(), want.get_stress(), rtol=0, atol=1e-8)
  assert last.info["md_time_fs"] == pytest.approx(CUT * 1.0)
  assert set(last.info["md_state"]) == set(ref_frames[-1].info["md_state"])
  if fmt == "extxyz":  # plain ASE reads it too
    plain = ase.io.read(path, ":")
    assert len(plain) == len(frames)
    np.testing.assert_allclose(plain[-1].get_forces(), last.get_forces())
  if fmt == "h5":
    check_h5md_layout(path, frames)

  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # "saved integrator state does not match"
    resumed = md.run(cu32(), pot, total_steps=STEPS, traj=path, resume=True, **KW)
  assert resumed.first_step == CUT and resumed.total_steps == STEPS
  got = md.read_trajectory(path)
  assert steps_of(got) == steps_of(ref_frames)
  dx = max(np.abs(a.positions - b.positions).max() for a, b in zip(got, ref_frames))
  print(f"{fmt}: resumed at step {CUT}, max |dx| = {dx:.1e} Å vs the straight run")
  assert dx <= tol
  np.testing.assert_allclose(resumed.atoms.get_momenta(), ref.atoms.get_momenta(), rtol=0, atol=tol)


def test_frame_stress_is_the_ase_calculators(pot, straight):
  # the engine's virial (strain derivative in its rotated fractional frame) comes out as ASE's
  # stress: the same as plugin.ase.Calculator's for the frame's positions and cell
  from plugin.ase import Calculator

  _, frames = straight
  frame = frames[-1]
  atoms = frame.copy()
  atoms.calc = Calculator(pot, dtype="float64")
  np.testing.assert_allclose(frame.get_stress(), atoms.get_stress(), rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(frame.get_forces(), atoms.get_forces(), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------
# killed runs


CHILD = """
import os, pathlib, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import conftest  # float64, the test compilation cache (shared with this session)
import test_md_output as t
import plugin.md as md
from plugin.md import output

# one run writes every format (each frame goes to all three files), then is killed
append, base = output.append_frames, pathlib.Path({base!r})
output.append_frames = lambda path, frames: [append(base.with_suffix("." + fmt), frames)
                                             for fmt in t.FORMATS]

def kill_after(p):
  if p.step >= {cut}:
    os.kill(os.getpid(), signal.SIGKILL)  # right after a chunk's frames were written

md.run(t.cu32(), t.tiny_copper_potential(3.0), total_steps={steps}, traj=str(base) + ".traj",
       progress=kill_after, **t.KW)
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """A folder with killed.{traj,extxyz,h5}: one run SIGKILLed after step CUT's frames."""
  folder = tmp_path_factory.mktemp("killed")
  code = CHILD.format(
    root=str(ROOT), tests=str(ROOT / "tests"), cut=CUT, steps=STEPS, base=str(folder / "killed")
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  return folder


def tear(path: pathlib.Path, fmt: str) -> None:
  """Leave a frame cut short at the end, as a kill -9 inside a write would."""
  if fmt == "extxyz":
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text) + "".join(text[:20]))  # a frame's first 20 lines
  elif fmt == "traj":
    with open(path, "ab") as f:
      f.write(os.urandom(300))
  else:
    import h5py

    with h5py.File(path, "a") as f:  # position written, the rest of the frame not
      ds = f["particles/all/position/value"]
      ds.resize(ds.shape[0] + 1, axis=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_killed_run_reads_back_to_its_last_frame_and_resumes(pot, straight, killed, tmp_path, fmt):
  _, ref_frames = straight
  path = tmp_path / f"killed.{fmt}"
  shutil.copy(killed / f"killed.{fmt}", path)
  assert steps_of(md.read_trajectory(path)) == list(range(0, CUT + 1, 10))
  tear(path, fmt)
  assert steps_of(md.read_trajectory(path)) == list(range(0, CUT + 1, 10))
  resumed = md.run(cu32(), pot, total_steps=STEPS, traj=path, resume=True, **KW)
  assert resumed.first_step == CUT
  got = md.read_trajectory(path)
  assert steps_of(got) == steps_of(ref_frames)
  np.testing.assert_allclose(
    got[-1].positions, ref_frames[-1].positions, rtol=0, atol=TOLERANCE[fmt]
  )


@pytest.mark.slow  # two CLI processes compiling (about 2 minutes on one core)
def test_cli_sigterm_keeps_the_frames_and_resumes(tiny_model_files, tmp_path):
  # a batch system's time limit: SIGTERM while `eqattn md` runs; exit 143, frames kept
  import time

  structure, out = tmp_path / "cu.extxyz", tmp_path / "md.h5"
  ase.io.write(structure, cu32())
  argv = [
    sys.executable,
    "-m",
    "plugin.cli",
    "md",
    str(structure),
    "--model",
    tiny_model_files["copper"],
    "--ensemble",
    "nve",
    "--dt",
    "1",
    "--out",
    str(out),
  ]
  proc = subprocess.Popen(
    argv + ["--steps", "100000"],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
      if out.exists() and len(md.read_trajectory(out)) >= 3:
        break
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 143 and "terminated (SIGTERM)" in err, err[-2000:]
  frames = md.read_trajectory(out)
  assert len(frames) >= 3 and np.all(np.isfinite(frames[-1].positions))
  done = int(frames[-1].info["md_step"])
  more = subprocess.run(
    argv + ["--steps", str(done + 100), "--resume"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert more.returncode == 0, more.stderr[-2000:]
  assert md.read_trajectory(out, -1).info["md_step"] == done + 100


def test_resume_keeps_one_log_row_per_step(pot, tmp_path):
  # the trajectory lost its last frame (a cut), the CSV log kept rows past it and a row cut
  # mid-write: the resumed run's log has every step exactly once
  path, log = tmp_path / "cut.extxyz", tmp_path / "cut.csv"
  md.run(cu32(), pot, total_steps=CUT, traj=path, log_file=log, **KW)
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(lines[: -(len(cu32()) + 2)]))  # the frame at CUT is gone
  with open(log, "a") as f:
    f.write(f"{CUT + 10},0.1,-3")  # a row cut short
  resumed = md.run(cu32(), pot, total_steps=STEPS, traj=path, log_file=log, resume=True, **KW)
  assert resumed.first_step == CUT - 10
  with open(log) as f:
    steps = [int(float(line.split(",")[0])) for line in f.read().splitlines()[1:]]
  assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == STEPS
  assert steps == list(range(0, STEPS + 1, 10))


def test_traj_cut_at_its_end_reads_back_and_resumes(pot, straight, killed, tmp_path):
  # a .traj cut at its end (disk full) loses the tail of its last counted frame: it reads back
  # to the frame before, and a resume rewrites the good frames and continues from there
  _, ref_frames = straight
  path = tmp_path / "cut.traj"
  shutil.copy(killed / "killed.traj", path)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size - 37)
  assert steps_of(md.read_trajectory(path)) == list(range(0, CUT, 10))
  assert md.read_trajectory(path, -1).info["md_step"] == CUT - 10
  resumed = md.run(cu32(), pot, total_steps=STEPS, traj=path, resume=True, **KW)
  assert resumed.first_step == CUT - 10 and steps_of(md.read_trajectory(path)) == steps_of(
    ref_frames
  )
  np.testing.assert_allclose(
    md.read_trajectory(path, -1).positions, ref_frames[-1].positions, rtol=0, atol=1e-9
  )
  # a file damaged beyond that is one ValueError naming it
  path.write_bytes(b"not a trajectory at all" * 10)
  with pytest.raises(ValueError, match="cannot read .*cut.traj"):
    md.read_trajectory(path)


def test_progress_bar_eta_from_the_steady_rate():
  # the first chunk compiles: no rate or ETA until a second one ran, then from the steady rate
  clock = iter([110.0, 111.0])
  bar = output.ProgressBar(1000, 1.0, clock=lambda: next(clock))
  bar.update(100, 300.0, -1.0)
  assert "ETA" not in bar.bar.postfix and "T=300 K" in bar.bar.postfix
  bar.update(200, 301.0, -1.0)  # 100 steps in 1 s: 800 left, 8 s at 100 steps/s
  assert "ETA 00:08" in bar.bar.postfix and "8.64 ns/day" in bar.bar.postfix
  bar.close()
