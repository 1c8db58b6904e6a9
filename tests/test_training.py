import dataclasses
import warnings

import jax
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

import potentials as pt
from potentials import training
from potentials.training import loop
from potentials.training.splits import split_parts
from plugin.data import read_frames

from conftest import TickClock

HYPER = dict(features=8, max_degree=1, num_iterations=2, num_heads=2, num_basis=6)


@pytest.fixture(scope="module")
def copper_images():
  rng = np.random.default_rng(0)
  images = []
  for i in range(16):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.set_cell(a.cell[:] @ (np.eye(3) + rng.normal(0, 0.01, (3, 3))), scale_atoms=True)
    a.rattle(0.05, seed=i)
    a.calc = EMT()
    a.get_potential_energy(), a.get_forces(), a.get_stress()
    images.append(a)
  return images


@pytest.fixture(scope="module")
def copper_frames(copper_images):
  return read_frames(copper_images, cutoff=3.0)


def test_read_frames_labels(copper_frames, copper_images, tmp_path):
  f = copper_frames[0]
  assert f.energy is not None and f.forces.shape == (4, 3) and f.stress.shape == (3, 3)
  assert f.volume > 0 and len(f.dst) > 0 and np.all(np.diff(f.dst) >= 0)
  m = molecule("H2O")
  with pytest.raises(ValueError, match="no energy or force labels"):
    read_frames([m], cutoff=3.0)
  # a compressed file (decompressed in memory first) reads as the plain one, labels and tags
  import ase.io

  names = ("cu.extxyz", "cu.extxyz.gz", "cu.extxyz.bz2")
  for name in names:
    ase.io.write(tmp_path / name, copper_images[:5])
  plain, *packed = (read_frames(str(tmp_path / n), 3.0) for n in names)
  for frames in packed:
    assert len(frames) == 5
    for a, b in zip(plain, frames):
      np.testing.assert_array_equal(a.forces, b.forces)
      assert a.energy == b.energy and np.array_equal(a.stress, b.stress)
  assert len(read_frames(str(tmp_path / "cu.extxyz.gz"), 3.0, index="1:3")) == 2


def test_element_shift_fit_is_exact_for_additive_energies():
  pot = pt.Potential.create(0, species=["H", "O"], cutoff=3.0, **HYPER)
  rng = np.random.default_rng(0)
  frames = []
  for _ in range(10):
    nh, no = rng.integers(1, 5), rng.integers(1, 4)
    z = np.array([1] * nh + [8] * no)
    frames.append(
      training.Frame(
        z,
        np.zeros((len(z), 3)),
        np.zeros((3, 3)),
        np.zeros(3, bool),
        np.zeros(0, int),
        np.zeros(0, int),
        np.zeros((0, 3)),
        energy=-13.6 * nh - 2041.0 * no,
      )
    )
  np.testing.assert_allclose(training.fit_element_shifts(pot, frames), [-13.6, -2041.0])


def test_refit_shifts_removes_a_uniform_energy_offset(copper_frames):
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  pred = training.predict_energies(pot, copper_frames, batch_size=8)
  # references = this model's energies + 0.05 eV per atom: the best shift moves by +0.05
  frames = [
    dataclasses.replace(f, energy=float(e) + 0.05 * f.num_atoms)
    for f, e in zip(copper_frames, pred)
  ]
  fitted = training.refit_shifts(pot, frames, batch_size=8)
  assert float(fitted.params["shift"][0] - pot.params["shift"][0]) == pytest.approx(0.05, abs=1e-5)
  np.testing.assert_allclose(
    training.predict_energies(fitted, frames, batch_size=8), [f.energy for f in frames], atol=1e-4
  )


def test_stress_prediction_matches_model_definition(copper_frames):
  # the batched predictor's stress equals a finite difference of the batched energy
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  frames = copper_frames[:3]
  cap = training.batch_capacity(frames, 3)
  b = training.make_batch(frames, pot, 3, *cap)
  predict = jax.jit(training.predict_fn(pot))
  e, f, s = predict(pot.params, training.device_batch(b, np.float64))
  h = 1e-5
  f0 = frames[1]
  for i, j in [(0, 0), (1, 2)]:
    eps = np.zeros((3, 3))
    eps[i, j] = eps[j, i] = h

    def energy(sign):
      g = training.Frame(
        f0.numbers,
        f0.positions @ (np.eye(3) + sign * eps),
        f0.cell @ (np.eye(3) + sign * eps),
        f0.pbc,
        f0.dst,
        f0.src,
        f0.shifts,
      )
      bb = training.make_batch([g], pot, 1, *training.batch_capacity([g], 1))
      return float(predict(pot.params, training.device_batch(bb, np.float64))[0][0])

    fd = (energy(1) - energy(-1)) / (2 * h) / f0.volume / (1 if i == j else 2)
    assert abs(float(s[1, i, j]) - fd) < 1e-7 * max(1.0, abs(fd))


def test_training_lowers_loss_writes_loadable_model_and_resumes(copper_frames, tmp_path):
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  cfg = training.TrainConfig(epochs=3, batch_size=4, learning_rate=5e-3, warmup_epochs=1)
  ckpt = tmp_path / "ckpt.msgpack"
  res = training.train(
    pot, copper_frames, cfg, checkpoint=str(ckpt), progress=False, dtype=np.float64
  )
  losses = [h["train_loss"] for h in res.history]
  assert len(losses) == 3 and losses[-1] < losses[0]
  assert res.metrics["test"]["forces_mae"] > 0 and "stress_mae" in res.metrics["test"]
  path = tmp_path / "cu.eqm"
  res.potential.save(path)
  back = pt.load(path)
  assert back.metadata["test_metrics"]["forces_mae"] == pytest.approx(
    res.metrics["test"]["forces_mae"]
  )
  # resume: one more epoch continues from the checkpoint (epoch counter and history carry on)
  cfg6 = training.TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_epochs=1)
  res2 = training.train(
    pot, copper_frames, cfg6, checkpoint=str(ckpt), progress=False, dtype=np.float64
  )
  assert [h["epoch"] for h in res2.history] == [1, 2, 3, 4]
  assert res2.history[:3] == res.history
  with pytest.raises(ValueError, match="truncated or corrupt"):
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    training.train(pot, copper_frames, cfg6, checkpoint=str(ckpt), progress=False)


@pytest.mark.slow  # tests/test_cli.py fine-tunes with --init by default
def test_fine_tune_starts_from_the_model_as_it_is(copper_frames):
  # a trained-looking model (its own energy scale); with a vanishing learning rate the
  # fine-tuned model's forces are the original's (shifts are refitted, forces do not see
  # them), while a fresh start re-derives the scale from the data and changes them
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  pot = pot.replace(
    params={**pot.params, "scale": np.array([3.0], np.float32)}, metadata={"note": "v1"}
  )
  cfg = training.TrainConfig(
    epochs=1, batch_size=4, learning_rate=1e-12, warmup_epochs=1, ema_decay=0.0
  )  # no averaging: its float32 rounding alone moves the weights by ~1e-8
  frames = copper_frames[:8]
  forces = lambda p: np.concatenate(
    [f for _, _, (_, f, _) in training.predictions(p, frames, batch_size=4, dtype=np.float64)]
  )
  kept = training.train(pot, frames, cfg, fine_tune=True, progress=False, dtype=np.float64)
  fresh = training.train(pot, frames, cfg, progress=False, dtype=np.float64)
  f0 = forces(pot)
  np.testing.assert_allclose(forces(kept.potential), f0, atol=1e-9)
  assert np.abs(forces(fresh.potential) - f0).max() > 1e-3
  assert kept.potential.metadata["fine_tuned_from"] == {}  # the start had no training record
  assert "fine_tuned_from" not in fresh.potential.metadata
  # fine-tuning a fine-tuned model keeps the chain (data/train.py's recipes in stages)
  again = training.train(
    kept.potential, frames, cfg, fine_tune=True, progress=False, dtype=np.float64
  )
  chain = again.potential.metadata["fine_tuned_from"]
  assert chain["training"]["epochs_run"] == 1 and chain["fine_tuned_from"] == {}


def _tagged(n_traj, per_traj, kind="md", temps=(300.0,)):
  """Untrained frames (only tags matter for splits): trajectories of per_traj frames."""
  out = []
  for t in temps:
    for k in range(n_traj):
      for _ in range(per_traj):
        out.append(
          training.Frame(
            np.array([29]),
            np.zeros((1, 3)),
            np.zeros((3, 3)),
            np.zeros(3, bool),
            np.zeros(0, int),
            np.zeros(0, int),
            np.zeros((0, 3)),
            energy=0.0,
            trajectory=f"{kind}/{t}/{k}",
            config_type=kind,
            temperature=t,
          )
        )
  return out


def test_trajectory_split_holds_out_whole_trajectories_per_temperature():
  frames = _tagged(4, 10, temps=(300.0, 600.0)) + _tagged(2, 10, kind="slab")
  cfg = training.TrainConfig()
  named = training.split_parts(frames, cfg)
  assert sorted(np.concatenate(list(named.values())).tolist()) == list(range(len(frames)))
  # test_random: a random 5 % of the training trajectories' frames, withheld from training
  assert len(named["test_random"]) == round(
    0.05 * (len(named["train"]) + len(named["test_random"]))
  )
  assert {frames[i].trajectory for i in named["test_random"]} <= {
    frames[i].trajectory for i in named["train"]
  }
  parts = training.split_frames(frames, cfg)
  assert all(np.array_equal(a, named[k]) for a, k in zip(parts, ("train", "valid", "test")))
  parts = (np.sort(np.concatenate([parts[0], named["test_random"]])),) + parts[1:]
  trajs = [{frames[i].trajectory for i in p} for p in parts]
  md = [{t for t in s if t.startswith("md")} for s in trajs]
  assert not (md[0] & md[1]) and not (md[0] & md[2]) and not (md[1] & md[2])
  for temp in (300.0, 600.0):  # every temperature has a held-out test and valid trajectory
    for p in parts[1:]:
      assert any(frames[i].temperature == temp and frames[i].config_type == "md" for i in p)
  # two slab trajectories are too few to hold out: each is cut into time blocks, test last
  for k in range(2):
    idx = [i for i, f in enumerate(frames) if f.trajectory == f"slab/300.0/{k}"]
    assert [i in parts[0] for i in idx] == [True] * 8 + [False] * 2
    assert idx[-1] in parts[2] and idx[-2] in parts[1]
  # deterministic, and the random split is still there
  assert all(
    np.array_equal(a, b)
    for a, b in zip(training.split_frames(frames, cfg), training.split_frames(frames, cfg))
  )
  rnd = training.split_frames(frames, dataclasses.replace(cfg, split="random"))
  assert [len(p) for p in rnd] == [len(frames) - 2 * 10, 10, 10]
  # stored configs from before the option were trained on the random split
  assert training.TrainConfig.from_dict({"epochs": 3}).split == "random"
  with pytest.raises(ValueError, match="split must be one of"):
    training.TrainConfig(split="frames")


def test_learning_rate_schedule_and_huber_loss():
  cfg = training.TrainConfig(learning_rate=1e-2, final_lr_fraction=0.1)
  lrs = [training.learning_rate(cfg, t, 100, 10) for t in range(101)]
  assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
  assert max(lrs) == pytest.approx(1e-2) and lrs[100] == pytest.approx(1e-3)
  assert all(a >= b - 1e-15 for a, b in zip(lrs[9:], lrs[10:]))
  with pytest.raises(ValueError, match="ema_decay"):
    training.TrainConfig(ema_decay=1.0)


@pytest.mark.slow  # the budget test drives a run by its time limit by default
def test_time_limit_ema_and_amsgrad(copper_frames, tmp_path):
  # a budget smaller than one epoch stops after the first, with valid (EMA) weights saved
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  cfg = training.TrainConfig(
    epochs=50,
    batch_size=4,
    time_limit=1e-3,
    ema_decay=0.99,
    optimizer="amsgrad",
    loss="huber",
    late_energy_weight=10.0,
  )
  res = training.train(pot, copper_frames, cfg, progress=False, dtype=np.float64)
  assert len(res.history) == 1 and np.isfinite(res.metrics["test"]["forces_mae"])
  meta = res.potential.metadata["training"]
  assert meta["epochs_run"] == 1 and meta["config"]["time_limit"] == 1e-3
  assert set(meta["split_parts"]) == {"train", "valid", "test", "test_random"}
  # untagged frames: one trajectory, cut into contiguous blocks (test = the last frames)
  assert meta["split"] == [11, 2, 2] and meta["split_parts"]["test_random"]["frames"] == 1
  assert "test_metrics_by_group" in res.potential.metadata
  assert res.potential.metadata["test_random_metrics"]["forces_mae"] > 0


def test_batch_size_by_pairs_when_not_given(copper_frames):
  """Unset, the batch holds about PAIRS_PER_BATCH neighbour pairs (1 to MAX_AUTO_BATCH
  frames); the number used is what the model file stores; a given batch size is kept."""
  from potentials.training import config as tc

  cfg = training.TrainConfig()
  assert cfg.batch_size is None
  assert cfg.frames_per_batch([72] * 5) == 8  # ethanol
  assert cfg.frames_per_batch([1300, 1290, 1250]) == 1  # a 32-atom alloy cell
  assert cfg.frames_per_batch([tc.PAIRS_PER_BATCH // 3]) == 3
  assert cfg.frames_per_batch([6]) == tc.MAX_AUTO_BATCH and cfg.frames_per_batch([]) == 8
  assert training.TrainConfig(batch_size=5).frames_per_batch([1300]) == 5
  with pytest.raises(ValueError, match="batch_size"):
    training.TrainConfig(batch_size=0)
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  res = training.train(pot, copper_frames, training.TrainConfig(epochs=1), progress=False)
  train_part = split_parts(copper_frames, cfg)["train"]
  expected = cfg.frames_per_batch([len(copper_frames[i].dst) for i in train_part])
  assert res.potential.metadata["training"]["config"]["batch_size"] == expected


def test_budget_drives_schedule_and_stop_epochs_cap_and_resume(copper_frames, tmp_path):
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  cfg = training.TrainConfig(batch_size=4, time_limit=240 / 60)  # 240 clock readings
  kw = dict(progress=False, dtype=np.float64)
  full = training.train(pot, copper_frames, cfg, clock=TickClock(), **kw)
  meta = full.potential.metadata["training"]
  # no epoch cap: the budget alone ends it, with only the measured finishing cost left
  assert cfg.epochs is None and meta["epochs_run"] > 10
  assert 240 - 10 < meta["training_seconds"] + meta["reserved_seconds"] <= 240 * 1.05
  assert meta["seconds"] <= 240 * 1.05
  lrs = [h["lr"] for h in full.history]
  peak, low = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction
  assert max(lrs) == pytest.approx(peak, rel=0.2) and lrs[-1] == pytest.approx(low, rel=0.3)
  assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # decays after warm-up
  # validation only when due, always at the end; the best weights are the ones kept
  checked = [h["valid_loss"] for h in full.history if h["valid_loss"] is not None]
  assert full.history[-1]["valid_loss"] is not None and meta["best_valid_loss"] == min(checked)
  # an explicit epoch count still caps, and the schedule ends with it
  capped = training.train(pot, copper_frames, dataclasses.replace(cfg, epochs=3), **kw)
  assert capped.potential.metadata["training"]["epochs_run"] == 3
  assert capped.history[-1]["lr"] == pytest.approx(low, rel=0.3)
  # killed after 120 readings, resumed from its checkpoint with the time it had left
  ckpt = str(tmp_path / "run.ckpt")
  with pytest.raises(KeyboardInterrupt):
    training.train(pot, copper_frames, cfg, checkpoint=ckpt, clock=TickClock(120), **kw)
  done = training.load_checkpoint(ckpt, {"epoch": 0, "elapsed": 0.0})
  resumed = training.train(pot, copper_frames, cfg, checkpoint=ckpt, clock=TickClock(), **kw)
  seconds = [h["seconds"] for h in resumed.history]
  assert seconds == sorted(seconds) and seconds[done["epoch"]] > done["elapsed"]
  assert abs(resumed.potential.metadata["training"]["epochs_run"] - meta["epochs_run"]) <= 3


def test_divergence_guard_restores_the_lowest_loss_epoch():
  # an epoch that climbs (3x) is kept but does not become the fallback; the one that then
  # diverges (10x) brings back the weights of the lowest-loss epoch, not of the one before
  state = {"params": 0, "ema": 0, "opt_state": 0, "lowest_loss": np.inf, "lr_scale": 1.0}
  safe = loop._weights(state)
  for epoch, (params, loss) in enumerate([(1, 1.0), (2, 0.1), (3, 0.3), (4, 5.0)], start=1):
    state.update(params=params, ema=params, opt_state=params)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      diverged, safe = loop._guard(state, safe, [loss], epoch)
    assert diverged == (epoch == 4) and len(caught) == diverged
  assert state["params"] == state["ema"] == state["opt_state"] == 2
  assert state["lowest_loss"] == 0.1 and state["lr_scale"] == 0.5


def test_diverged_epoch_is_dropped_and_learning_rate_halved(copper_frames):
  # a learning rate far too high: an epoch whose loss jumps 10-fold is undone (the weights of
  # the lowest-loss epoch come back) and the rest of the run goes on at half the learning rate
  pot = pt.Potential.create(0, species=["Cu"], cutoff=3.0, **HYPER)
  cfg = training.TrainConfig(epochs=8, batch_size=4, learning_rate=0.7, warmup_epochs=1)
  with pytest.warns(RuntimeWarning, match="training diverged at epoch"):
    res = training.train(pot, copper_frames, cfg, progress=False, dtype=np.float64)
  flagged = [h["epoch"] for h in res.history if h.get("diverged")]
  assert flagged and len(res.history) == 8  # it went on after each, at a lower rate
  assert np.isfinite(res.metrics["test"]["forces_mae"])
  assert np.isfinite(res.metrics["test"]["forces_mae"])
  # one that cannot be rescued says so and names the fix
  with pytest.raises(FloatingPointError, match="lower it \\(--lr\\)"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      training.train(
        pot, copper_frames, dataclasses.replace(cfg, learning_rate=1e3, epochs=10), progress=False
      )


def test_parts_of_a_training_set_share_one_evaluation_shape():
  """Frames of alike sizes (bulk and vacancy cells) are evaluated in one padded shape whatever
  the number of frames of a part (its last, partial batch included), so the train, validation,
  test and per-temperature parts compile once; frames of widely varied sizes keep their own
  size buckets (padding a 4-atom cell to a 500-atom shape would cost more than a compile)."""

  def frame(n, pairs):
    z = np.zeros(n, np.int32)
    return training.Frame(
      numbers=z + 29, positions=np.zeros((n, 3)), cell=np.eye(3), pbc=np.ones(3, bool),
      dst=np.zeros(pairs, np.int32), src=np.zeros(pairs, np.int32), shifts=np.zeros((pairs, 3)),
    )  # fmt: skip

  alike = [frame(32 - (k % 3 == 0), 1290 + k % 7) for k in range(171)]
  parts = (alike, alike[:90], alike[:30], alike[:9])
  shapes = {caps for part in parts for _, caps in training.buckets(part, 8, 4096)}
  assert len(shapes) == 1
  varied = [frame(n, 40 * n) for n in (4, 4, 8, 64, 300, 500)] * 10
  assert len({caps for _, caps in training.buckets(varied, 2, 4096)}) == 5
  # ... unless the whole set is small: molecules of 3 to 12 atoms share one shape, and the
  # reserve for finishing counts the shapes evaluation will compile
  small = [frame(3 + k % 10, 6 * (3 + k % 10)) for k in range(400)]
  assert len({caps for _, caps in training.buckets(small, 8, 4096)}) == 1
  from potentials.training.evaluation import evaluation_shapes

  assert evaluation_shapes([small, small[:50], varied[:6]], 8) == 2
  assert evaluation_shapes([alike, alike[:9]], 8) == 1
