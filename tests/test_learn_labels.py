"""plugin.learn's reference layer: specs, label workers that survive a misbehaving reference,
and the append-only label file that survives a kill mid-write."""

import json
import os
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from plugin.learn.labels import (
  LabelError,
  LabelFile,
  LabelPool,
  isolated_atom_energies,
  label_one,
)
from plugin.learn.reference import check_spec, reference_from_spec

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
  """`tests.learn_refs:...` specs import from the repository root, in the parent and (through
  the parent's sys.path) in spawned workers."""
  monkeypatch.syspath_prepend(ROOT)


def copper(n: int, bad=()) -> list:
  """n rattled, strained 2x2x2 Cu fcc cells; frames in ``bad`` make tests.learn_refs
  misbehave."""
  frames = []
  for i in range(n):
    a = bulk("Cu", "fcc", a=3.6 + 0.02 * i, cubic=True).repeat(2)
    a.rattle(0.08, seed=i)
    a.info["bad"] = i in bad
    frames.append(a)
  return frames


def test_emt_pool_matches_in_process():
  frames = copper(6)
  with LabelPool("emt", workers=2, timeout=30) as pool:
    out = list(pool.label(frames, stress=True))
  assert sorted(i for i, _, _ in out) == list(range(6))
  ref = EMT()
  for i, result, reason in out:
    assert reason is None
    want = label_one(ref, frames[i], stress=True)
    assert abs(result["energy"] - want["energy"]) < 1e-10
    np.testing.assert_allclose(result["forces"], want["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(result["stress"], want["stress"], rtol=0, atol=1e-10)
    assert result["forces"].shape == (32, 3) and result["stress"].shape == (3, 3)
    assert np.abs(result["forces"]).max() > 0.1  # rattled: real forces, not zeros
  assert len({round(r["energy"], 8) for _, r, _ in out}) == 6  # each frame its own label


def test_label_one_stress_only_when_periodic():
  a = copper(1)[0]
  assert "stress" not in label_one(EMT(), a, stress=False)
  a.pbc = [True, True, False]
  assert "stress" not in label_one(EMT(), a, stress=True)
  with pytest.raises(LabelError, match="non-finite forces"):
    label_one(reference_from_spec("tests.learn_refs:nan"), copper(2, bad=[1])[1], stress=False)


@pytest.mark.parametrize(
  "name, reason",
  [
    ("raising", "RuntimeError: SCF not converged"),
    ("nan", "LabelError: non-finite forces"),
    ("sleeping", "timeout after 1 s"),
    ("exiting", "worker process died (exit code 1)"),
  ],
)
def test_misbehaving_reference_fails_frames_not_the_pool(tmp_path, name, reason):
  spec = f"tests.learn_refs:{name}"
  frames = copper(5, bad=[1, 3])
  store = LabelFile(tmp_path / "labels.extxyz")
  # one worker: the frames after each failure can only be labelled if the pool recovered
  with LabelPool(spec, workers=1, timeout=1.0) as pool:
    start = time.monotonic()
    for i, result, why in pool.label(frames, stress=True):
      if result is None:
        store.fail(frames[i], why, reference=spec, round=2, source="explore")
      else:
        store.append(frames[i], result, reference=spec, round=2, source="explore")
    elapsed = time.monotonic() - start
    again = list(pool.label(copper(2), stress=False))  # the same pool still works
  assert [why for _, _, why in again] == [None, None]
  failures = store.failures()
  assert len(failures) == 2
  for f in failures:
    assert f["reason"].startswith(reason), f["reason"]
    assert (f["round"], f["source"], f["reference"]) == (2, "explore", spec)
  assert sorted(np.asarray(f["positions"]).sum() for f in failures) == pytest.approx(
    sorted(frames[i].positions.sum() for i in (1, 3))
  )
  labelled = ase.io.read(store.path, ":")
  assert len(labelled) == 3
  got = sorted(a.get_potential_energy() for a in labelled)
  want = sorted(label_one(EMT(), frames[i], stress=False)["energy"] for i in (0, 2, 4))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert all(a.info["round"] == 2 and a.info["source"] == "explore" for a in labelled)
  if name == "sleeping":
    assert elapsed < 30  # killed at the timeout, not after the reference's 60 s sleep


def test_in_process_pool_and_calculator_object():
  frames = copper(4, bad=[2])
  with LabelPool("tests.learn_refs:raising", workers=0) as pool:
    out = list(pool.label(frames, stress=False))
  assert [i for i, _, _ in out] == [0, 1, 2, 3]  # frame order in-process
  assert [why is None for _, _, why in out] == [True, True, False, True]
  assert "SCF not converged" in out[2][2]
  calc = EMT()
  with LabelPool(calc, workers=0) as pool:
    ((i, result, why),) = pool.label(frames[:1], stress=True)
  assert pool.calc is calc and why is None and result["stress"].shape == (3, 3)
  with pytest.raises(ValueError, match="workers=0"):
    LabelPool(EMT(), workers=2)


def test_worker_that_cannot_build_its_reference_is_fatal():
  with pytest.raises(RuntimeError, match="could not be built.*libdft.so"):
    with LabelPool("tests.learn_refs:broken", workers=1, timeout=5) as pool:
      list(pool.label(copper(1), stress=False))


def _labelled(n: int, tmp_path) -> LabelFile:
  store = LabelFile(tmp_path / "labels.extxyz")
  for i, a in enumerate(copper(n)):
    store.append(a, label_one(EMT(), a, stress=True), reference="emt", round=0, source="seed")
  return store


@pytest.mark.parametrize("cut", ["mid_line", "line_boundary", "header_only"])
def test_label_file_drops_a_frame_cut_mid_write(tmp_path, cut):
  store = _labelled(4, tmp_path)
  data = store.path.read_bytes()
  last = data.rfind(b"\n32\n") + 1  # start of the 4th frame's count line
  body = data[last:]
  lines = body.splitlines(keepends=True)
  if cut == "mid_line":
    size = last + len(lines[0]) + len(lines[1]) + 10 * len(lines[2]) + len(lines[2]) // 2
  elif cut == "line_boundary":
    size = last + sum(len(x) for x in lines[:20])
  else:
    size = last + len(lines[0]) + len(lines[1]) // 3
  assert data[:size].endswith(b"\n") == (cut == "line_boundary")
  os.truncate(store.path, size)
  frames = LabelFile(store.path).read()
  assert len(frames) == 3
  want = [label_one(EMT(), a, stress=True) for a in copper(3)]
  for a, w in zip(frames, want):
    assert a.get_potential_energy() == pytest.approx(w["energy"], abs=1e-7)
    np.testing.assert_allclose(a.get_forces(), w["forces"], atol=1e-7)
    np.testing.assert_allclose(a.get_stress(voigt=False), w["stress"], atol=1e-9)
    assert a.info["source"] == "seed" and a.info["reference"] == "emt"
  resumed = LabelFile(store.path)
  assert resumed.repair() > 0
  assert ase.io.read(store.path, ":")[-1].info["source"] == "seed"
  extra = copper(5)[4]
  resumed.append(
    extra, label_one(EMT(), extra, stress=True), reference="emt", round=1, source="explore"
  )
  frames = ase.io.read(store.path, ":")
  assert len(frames) == 4 and frames[-1].info["source"] == "explore"
  assert frames[-1].info["round"] == 1
  assert len(LabelFile(store.path).read()) == 4


def test_first_append_repairs_and_failures_survive_a_cut_line(tmp_path):
  store = _labelled(2, tmp_path)
  a = copper(1)[0]
  store.fail(a, "timeout after 5 s", reference="emt", round=0, source="seed")
  size = store.path.stat().st_size
  os.truncate(store.path, size - 40)
  with open(store.failures_path, "a") as fh:
    fh.write('{"round": 0, "reas')  # a failure line cut mid-write
  assert len(store.failures()) == 1
  fresh = LabelFile(store.path)  # no explicit repair: append must not glue onto the cut frame
  fresh.append(a, label_one(EMT(), a, stress=False), reference="emt", round=1, source="x")
  fresh.fail(a, "worker process died", reference="emt", round=1, source="x")
  assert len(ase.io.read(store.path, ":")) == 2
  lines = store.failures_path.read_text().splitlines()
  assert [json.loads(x)["reason"] for x in lines] == ["timeout after 5 s", "worker process died"]


def test_spec_validation():
  with pytest.raises(ValueError, match="unknown reference 'dft'.*'gfn2', 'gfn1', 'emt'"):
    check_spec("dft")
  with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
    check_spec("no_such_module_xyz:make")
  with pytest.raises(ValueError, match="has no attribute 'missing'"):
    check_spec("tests.learn_refs:missing")
  with pytest.raises(ValueError, match="'NOT_CALLABLE' is not callable"):
    check_spec("tests.learn_refs:NOT_CALLABLE")
  with pytest.raises(ValueError, match="not one of"):
    check_spec("tests.learn_refs:")
  with pytest.raises(ValueError, match="not an ASE calculator.*get_potential_energy"):
    reference_from_spec("tests.learn_refs:not_a_calculator")
  with pytest.raises(ValueError, match="unknown reference"):
    LabelPool("gfn3", workers=0)
  assert check_spec(" GFN2 ") == "GFN2"
  assert check_spec("tests.learn_refs:raising") == "tests.learn_refs:raising"
  assert isinstance(reference_from_spec("emt"), EMT)
  assert type(reference_from_spec("gfn1")).__name__ == "TBLite"


def test_isolated_atoms_emt_and_spin_retry():
  got = isolated_atom_energies(EMT(), [29, 29, 79, 29])
  assert sorted(got) == [29, 79]
  for z, e in got.items():
    lone = Atoms(numbers=[z], positions=[[10, 10, 10]], cell=[20] * 3)
    assert e == pytest.approx(label_one(EMT(), lone, stress=False)["energy"], abs=1e-12)
    assert abs(e) > 0.1  # EMT's zero is the fcc crystal: a lone atom costs the cohesive energy
  # a reference that refuses odd-electron atoms without a spin gets retried with one, in a
  # worker too (the initial magnetic moments cross the pipe)
  with LabelPool("tests.learn_refs:needs_spin", workers=1, timeout=10) as pool:
    spun = isolated_atom_energies(pool, [29, 28])
  assert spun == pytest.approx(isolated_atom_energies(EMT(), [28, 29]), abs=1e-12)
  with pytest.raises(LabelError, match="Z=2.*unpaired"):
    isolated_atom_energies(EMT(), [2])  # EMT has no helium: both tries fail


def test_gfn2_water():
  pytest.importorskip("tblite", reason="gfn2 needs the data extra: pip install 'eqattn[data]'")
  water = molecule("H2O")
  water.center(vacuum=5.0)
  result = label_one(reference_from_spec("gfn2"), water, stress=True)
  assert "stress" not in result  # a molecule: no stress
  assert result["forces"].shape == (3, 3) and np.all(np.isfinite(result["forces"]))
  assert -200 < result["energy"] < -100  # GFN2-xTB water: about -137.9 eV
  assert abs(result["forces"].sum(axis=0)).max() < 1e-6  # no net force on a free molecule
  atoms = isolated_atom_energies("gfn2", [1, 8])
  assert atoms[1] == pytest.approx(-10.707, abs=1e-2)  # a lone H needs no spin in tblite
  assert result["energy"] < 2 * atoms[1] + atoms[8]  # water is bound


def test_abandoned_iteration_stops_busy_workers():
  frames = copper(2, bad=[0])  # frame 0 hangs, frame 1 comes back first
  start = time.monotonic()
  with LabelPool("tests.learn_refs:sleeping", workers=2, timeout=30) as pool:
    procs = [s.proc for s in pool._slots]
    for i, result, why in pool.label(frames, stress=False):
      break
    assert (i, why) == (1, None)
    assert sum(p.is_alive() for p in procs) == 1  # the one still on frame 0 was stopped
    again = list(pool.label(copper(3), stress=False))  # no stale reply from frame 0
  assert sorted(i for i, _, _ in again) == [0, 1, 2]
  assert all(why is None for _, _, why in again)
  assert time.monotonic() - start < 20  # neither the 60 s hang nor the 30 s timeout
