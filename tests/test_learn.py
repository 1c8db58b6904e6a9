"""Active learning (plugin.learn, `eqattn learn`): selection, the loop end to end with EMT,
failed reference calls, resume after a kill, and the command's checks."""

import json
import types

import ase.build
import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT

import potentials
from plugin import cli
from plugin.learn import LearnOptions, learn, loop
from plugin.learn import explore as explore_lib
from plugin.learn import seed as seed_lib
from plugin.learn.labels import LabelFile, LabelPool
from plugin.learn.state import LearnState
from plugin.learn.select import fingerprint, select

# a model and budgets small enough for a loop in well under a minute on 2 cores
TINY = dict(cutoff=3.5, features=8, max_degree=1, num_iterations=1, num_heads=1, num_basis=4)
QUICK = dict(
  reference="emt",
  temperatures=(300.0, 700.0),
  time_limit=2.0,  # round 0 must end with time for round 1 on a slow, loaded machine
  max_labels=22,
  uncertainty_target=0.01,  # below what this model reaches: every round labels
  seed_labels=8,
  seed_md=False,  # rattles only: the call counts below (FlakyEMT) are those of labels
  per_round=6,
  check_per_round=2,
  replicas=1,
  explore_ps=0.1,
  workers=0,
  final_fraction=0.2,
  model=TINY,
  train={"batch_size": 4, "readout_minutes": 0.02, "epochs": 4},  # epochs cap: a quick test
)


def copper():
  return ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)


class FlakyEMT(EMT):
  """EMT whose every ``fail_every``-th call raises (an SCF that did not converge), and whose
  ``interrupt_at``-th call raises KeyboardInterrupt (a kill in the middle of labelling)."""

  def __init__(self, fail_every=0, interrupt_at=0):
    super().__init__()
    self.calls, self.fail_every, self.interrupt_at = 0, fail_every, interrupt_at

  def calculate(self, *args, **kwargs):
    self.calls += 1
    if self.interrupt_at and self.calls == self.interrupt_at:
      raise KeyboardInterrupt
    if self.fail_every and self.calls % self.fail_every == 0:
      raise RuntimeError("SCF not converged")
    return super().calculate(*args, **kwargs)


def test_fingerprint_is_invariant():
  a = copper().repeat((2, 1, 1))
  a.rattle(0.1, seed=1)
  species, fp = [29], fingerprint(a, [29], 3.5)
  b = a.copy()
  b.translate([0.3, -0.2, 0.5])
  b.wrap()
  perm = np.random.default_rng(0).permutation(len(a))
  c = a[perm]
  np.testing.assert_allclose(fingerprint(b, species, 3.5), fp, atol=1e-10)
  np.testing.assert_allclose(fingerprint(c, species, 3.5), fp, atol=1e-10)
  mol = ase.build.molecule("CH3CH2OH")
  rot = mol.copy()
  rot.rotate(73, (1, 2, 3), center="COM")
  sp = [1, 6, 8]
  np.testing.assert_allclose(fingerprint(rot, sp, 3.5), fingerprint(mol, sp, 3.5), atol=1e-10)
  perfect = fingerprint(copper().repeat((2, 1, 1)), species, 3.5)
  assert np.linalg.norm(fp - perfect) > 0.05  # it sees a rattle


def test_selection_is_uncertain_and_diverse():
  """Ten near-copies of one uncertain event and five distinct, less uncertain frames: four
  picks take one copy of the event and three distinct frames, never a second copy."""
  event, frames = copper().repeat((2, 1, 1)), []
  for k in range(10):
    a = event.copy()
    a.rattle(0.002, seed=k)
    frames.append(a)
  for k in range(5):
    a = event.copy()
    a.rattle(0.12, seed=100 + k)
    frames.append(a)
  scores = np.array([1.0] * 10 + [0.4, 0.5, 0.3, 0.45, 0.05])
  fps = np.array([fingerprint(a, [29], 3.5) for a in frames])
  picked = select(scores, fps, 4, threshold=0.1)
  assert picked[0] < 10 and sum(i < 10 for i in picked) == 1
  assert sorted(picked[1:]) == [10, 11, 13]  # the distinct ones above the threshold
  assert 14 not in select(scores, fps, 15, threshold=0.1)  # under the target: no label
  # a frame like one already labelled counts for little
  again = select(scores, fps, 1, labelled=fps[:1], threshold=0.1)
  assert again[0] >= 10
  assert select(scores, fps, 3, threshold=2.0) == []


def test_options_are_checked():
  with pytest.raises(ValueError, match="temperatures must be > 0 K"):
    LearnOptions(temperatures=(300.0, -1.0))
  with pytest.raises(ValueError, match="readout_heads must be >= 2"):
    LearnOptions(readout_heads=1)
  with pytest.raises(ValueError, match="seed_labels .* exceed max_labels"):
    LearnOptions(seed_labels=30, max_labels=20)
  a, b = LearnOptions(time_limit=5.0, workers=1), LearnOptions(time_limit=60.0, workers=3)
  assert a.fingerprint() == b.fingerprint()  # budgets may change on resume
  assert LearnOptions(reference="gfn1").fingerprint() != a.fingerprint()
  assert LearnOptions().timestep_for([1, 6]) == 0.5 and LearnOptions().timestep_for([29]) == 2.0


def test_rounds_fit_their_fixed_costs():
  """A round whose fixed costs (MD, scoring, labels, errors) leave its training less time than
  they took is not planned: the time goes to the final training instead."""
  options = LearnOptions(**{**QUICK, "time_limit": 15.0, "final_fraction": 0.3, "rounds": 3})
  now = [0.0]
  no_labels = types.SimpleNamespace(read=list, failures=list)
  ctx = types.SimpleNamespace(options=options, minutes=lambda: now[0], labels=no_labels)
  state = types.SimpleNamespace(rounds=[])
  assert loop.shares_left(ctx, state) == 5  # 3 rounds + round 0's two: nothing measured yet
  assert loop.share_minutes(ctx, state) == pytest.approx(2 * 10.5 / 5)
  round_0 = {"round": 0, "started_minutes": 0.0, "train_minutes": 3.8, "minutes": 3.8}
  # round 1 as glycine's: 2.8 minutes, 0.3 of them training (2.5 fixed)
  round_1 = {"round": 1, "started_minutes": 3.8, "train_minutes": 0.3, "minutes": 6.6}
  state.rounds, now[0] = [round_0], 3.8
  assert loop.round_fixed_minutes(state) is None and loop.shares_left(ctx, state) == 3
  state.rounds, now[0] = [round_0, round_1], 6.6
  assert loop.round_fixed_minutes(state) == pytest.approx(2.5)
  assert loop.affordable_rounds(ctx, state) == 0  # 3.9 minutes left < 2 x 2.5
  assert loop.explore_round(ctx, state, None) == "time"
  # cheap rounds: the planned count stands; dearer ones: fewer, longer shares
  round_1["train_minutes"] = 2.5  # 0.3 fixed
  assert loop.shares_left(ctx, state) == 2 and loop.affordable_rounds(ctx, state) == 6
  state.rounds, now[0] = [round_0, {**round_1, "train_minutes": 1.6}], 6.6  # 1.2 fixed
  assert loop.affordable_rounds(ctx, state) == 1 and loop.shares_left(ctx, state) == 1
  assert loop.share_minutes(ctx, state) == pytest.approx(3.9)


def test_seed_md_only_where_the_reference_is_cheap(tmp_path):
  """Seed labels from MD with the reference where its calls fit 5 % of the time limit (one
  call timed on the start, kept as a label), else rattles only; MD frames carry the
  reference's labels, are spread over the ladder, and a kill mid-MD loses no finished run."""
  assert seed_lib.md_frames(0.002, 24, 15.0) == 16  # GFN2 on glycine: 0.6 s of MD
  assert seed_lib.md_frames(30.0, 24, 60.0) == 0  # a DFT call: 9600 s > 3 minutes
  plan = seed_lib.md_plan([copper(), copper()], (300.0, 700.0), 5)
  assert [n for _, _, n in plan] == [2, 1, 1, 1] and {(i, t) for i, t, _ in plan} == {
    (0, 300.0),
    (0, 700.0),
    (1, 300.0),
    (1, 700.0),
  }
  assert [n for _, _, n in seed_lib.md_plan([copper()] * 3, (300.0, 700.0), 2)] == [1, 1]
  options = LearnOptions(**{**QUICK, "seed_md": None, "seed_labels": 8})
  calls = FlakyEMT(interrupt_at=80)  # a kill in the second MD run (calls 1: start, 2-62: run 1)
  ctx = types.SimpleNamespace(
    options=options, starts=[copper()], pool=LabelPool(calls), log=print, folder=tmp_path,
    labels=LabelFile(tmp_path / "labels.extxyz"), reference_name="emt", minutes=lambda: 0.0,
  )  # fmt: skip
  state = LearnState(fingerprint={}, species=[29], current={"round": 0})
  assert loop._seed_md_count(ctx, state) == 5  # 2/3 of the 7 after the start
  with pytest.raises(KeyboardInterrupt):
    loop.seed_md(ctx, state)
  assert state.current["seed_md_runs"] == 1 and len(ctx.labels.read()) == 1 + 3
  ctx.pool = LabelPool(EMT())
  loop.seed_md(ctx, state)  # the resumed round runs what is left
  labels = ctx.labels.read()
  assert [a.info["source"] for a in labels] == ["start:0"] + [f"md:{k}" for k in range(5)]
  for a in labels[1:]:
    ref = a.copy()
    ref.calc = EMT()
    np.testing.assert_allclose(a.get_forces(), ref.get_forces(), atol=1e-6)
    assert np.abs(a.positions - copper().positions).max() > 0.01  # moved: thermal frames
  assert loop._seed_md_count(ctx, state) == 0  # the start was called once: not again
  never = types.SimpleNamespace(**{**vars(ctx), "options": LearnOptions(**QUICK)})
  assert loop._seed_md_count(never, state) == 0  # seed_md=False


def test_exploration_stops_at_its_deadline(tmp_path):
  """A round's MD ends at the first chunk end past its deadline, every replica with its frames
  kept, and no second pass starts however few candidates it has: exploration never takes
  the time of the round's labels and training."""
  options = LearnOptions(**{**QUICK, "uncertainty_target": 100.0})  # no uncertainty stops
  pot = potentials.Potential.create(0, species=["Cu"], readout_heads=2, force_heads=True, **TINY)
  ex = explore_lib.explore(
    pot, [copper()], options, folder=tmp_path, round_=1, wanted=1000, seconds=0.0
  )
  assert ex.stopped == ["max_wall_time"] * 2 and ex.cut and ex.runaways == 0
  assert len(ex.frames) == 2 and [a.info["md_step"] for a in ex.frames] == [1, 1]
  assert not list(tmp_path.glob("explore-1-1.*"))  # no second pass
  assert ex.top_max(700.0) == float("inf")  # a cut round is no proof of convergence


def test_loop_end_to_end_with_failures_and_resume_after_a_kill(tmp_path, capsys):
  """EMT copper from one structure: a kill in round 1's labelling, then --resume finishes
  the run; failed calls are recorded and skipped; no completed call is lost or repeated."""
  out = tmp_path / "learn"
  # calls: 1 isolated atom, 8 seeds (the 7th call fails), then round 1, cut at its 4th call
  killer = FlakyEMT(fail_every=7, interrupt_at=13)
  with pytest.raises(KeyboardInterrupt):
    learn([copper()], out=out, options=LearnOptions(**QUICK), reference=killer)
  state = json.loads((out / "state.json").read_text())
  assert state["pending"] == {"round": 1} and [r["round"] for r in state["rounds"]] == [0]
  labels_before = ase.io.read(out / "labels.extxyz", ":")
  failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
  assert len(labels_before) + len(failures) == 11  # every completed call, none lost
  assert failures[0]["reason"] == "RuntimeError: SCF not converged"

  with pytest.raises(ValueError, match="other settings .*reference: 'emt' -> 'gfn2'"):
    other = LearnOptions(**{**QUICK, "reference": "gfn2"})
    learn([copper()], out=out, options=other, resume=True)
  with pytest.raises(ValueError, match="holds a learning run"):
    learn([copper()], out=out, options=LearnOptions(**QUICK))

  result = learn([copper()], out=out, options=LearnOptions(**QUICK), resume=True,
                 reference=FlakyEMT(fail_every=5))  # fmt: skip
  report = result.report
  labels = ase.io.read(out / "labels.extxyz", ":")
  sources = [(a.info["round"], a.info["source"]) for a in labels]
  assert len(set(sources)) == len(sources)  # the resumed round labelled only what was left
  assert labels[: len(labels_before)] == labels_before
  assert report["reference_calls"] == len(labels) + report["failed_calls"] <= QUICK["max_labels"]
  rounds = report["rounds"]
  assert rounds[0]["round"] == 0 and rounds[1]["round"] == 1 and rounds[1]["next_round"]["select"]
  for a in labels:  # labels are the reference's: EMT energies and forces
    ref = a.copy()
    ref.calc = EMT()
    assert a.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    assert a.info["reference"] == "emt"
  assert report["minutes"] < 3 * QUICK["time_limit"]
  assert (out / "report.json").exists() and (out / "learn.png").exists()
  pot = potentials.load(out / "model.eqm")
  assert pot.metadata["learn"]["reference_calls"] == report["reference_calls"]
  assert pot.num_members == 4 and pot.config.force_heads
  capsys.readouterr()
  assert cli.main(["info", str(out / "model.eqm")]) == 0
  assert f"learnt from {report['reference_calls']} emt calls" in capsys.readouterr().out
  lone = EMT().get_potential_energy(ase.Atoms("Cu", cell=[20.0] * 3))
  assert report["isolated_atoms_eV"]["29"] == pytest.approx(lone)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["missing.xyz"], "does not exist"),
    (["{start}", "--reference", "dft"], "unknown reference 'dft': use 'gfn2'"),
    (["{start}", "--reference", "nosuchmodule:make"], "cannot import module 'nosuchmodule'"),
    (["{start}", "--temperatures", "300,-5"], None),
    (["{start}", "--out", "{missing}/run"], "nope does not exist (create it first)"),
    (["{start}", "--test", "{start}"], "every frame needs energy and forces"),
  ],
)
def test_learn_command_refuses_bad_input_before_any_work(tmp_path, capsys, argv, message):
  start = tmp_path / "start.xyz"
  ase.io.write(start, copper())
  argv = [a.format(start=start, missing=tmp_path / "nope") for a in argv]
  if message is None:  # argparse's own refusal
    with pytest.raises(SystemExit) as e:
      cli.main(["learn", *argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    return
  out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
  assert cli.main(["learn", *argv, *out]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not (tmp_path / "run").exists()  # nothing written


def test_learn_command_refuses_an_existing_run_without_resume(tmp_path, capsys):
  start = tmp_path / "start.xyz"
  ase.io.write(start, copper())
  run = tmp_path / "run"
  run.mkdir()
  (run / "state.json").write_text("{}")
  assert cli.main(["learn", str(start), "--reference", "emt", "--out", str(run)]) == 2
  assert "resume it (--resume) or choose a new folder" in capsys.readouterr().err
