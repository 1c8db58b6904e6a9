"""potentials.io: one container for model files and training checkpoints."""

from pathlib import Path

import numpy as np
import pytest

import potentials as pt
from potentials import elements, io

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoint_v1.ckpt"


def _state():
  """The state tests/data/legacy_checkpoint_v1.ckpt holds (written by eqattn before the
  container, with potentials.training.save_checkpoint)."""
  return {
    "params": {
      "dense": {
        "kernel": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "bias": np.array([0.5, -1.25], np.float32),
      }
    },
    "epoch": 3,
    "step": 12,
    "elapsed": 1.5,
    "best_loss": 0.125,
    "history": '[{"epoch": 1}]',
  }


def _template():
  return {
    "params": {"dense": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)}},
    "epoch": 0,
    "step": 0,
    "elapsed": 0.0,
    "best_loss": np.inf,
    "history": "[]",
  }


def _assert_state(got):
  want = _state()
  np.testing.assert_array_equal(got["params"]["dense"]["kernel"], want["params"]["dense"]["kernel"])
  np.testing.assert_array_equal(got["params"]["dense"]["bias"], want["params"]["dense"]["bias"])
  assert [got[k] for k in ("epoch", "step", "elapsed", "best_loss", "history")] == [
    want[k] for k in ("epoch", "step", "elapsed", "best_loss", "history")
  ]


def test_legacy_checkpoint_file_loads():
  assert LEGACY.read_bytes().startswith(io.LEGACY_CHECKPOINT_MAGIC)
  _assert_state(io.load_checkpoint(LEGACY, _template()))


def test_checkpoint_roundtrip_and_legacy_writer(tmp_path):
  new, old = tmp_path / "new.ckpt", tmp_path / "old.ckpt"
  io.save_checkpoint(new, _state())
  io.write_legacy_checkpoint(old, _state())
  assert new.read_bytes().startswith(io.CHECKPOINT_MAGIC)
  assert old.read_bytes() == LEGACY.read_bytes()  # the kept writer is the old format
  for path in (new, old):
    _assert_state(io.load_checkpoint(path, _template()))
  # the same payload under both headers
  assert new.read_bytes()[-100:] == old.read_bytes()[-100:]


def test_bad_checkpoints(tmp_path):
  io.save_checkpoint(tmp_path / "c", _state())
  data = (tmp_path / "c").read_bytes()
  legacy = LEGACY.read_bytes()
  cases = {
    "truncated": (data[:-10], "truncated or corrupt"),
    "legacy_truncated": (legacy[:-10], "truncated or corrupt"),
    "legacy_header": (legacy[:20], "truncated or corrupt"),
    "flipped": (data[:-5] + bytes([data[-5] ^ 1]) + data[-4:], "corrupt"),
    "model": (b"EQATTN-MODEL\n" + data[13:], "not an eqattn training checkpoint"),
    "version": (data[:13] + (7).to_bytes(4, "little") + data[17:], "version 7"),
  }
  for name, (blob, message) in cases.items():
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(pt.CheckpointError, match=message):
      io.load_checkpoint(tmp_path / name, _template())
  other = {**_template(), "params": {"other": np.zeros(3, np.float32)}}
  with pytest.raises(ValueError, match="does not match this training run"):
    io.load_checkpoint(tmp_path / "c", other)


def test_model_and_checkpoint_share_the_container(tmp_path):
  # a checkpoint is not a model file and vice versa: the header says which
  io.save_checkpoint(tmp_path / "c", _state())
  with pytest.raises(pt.ModelFileError, match="not an eqattn model"):
    pt.load(tmp_path / "c")
  version, content = io.read(
    tmp_path / "c", magic=io.CHECKPOINT_MAGIC, versions=(io.CHECKPOINT_VERSION,), what="checkpoint"
  )
  assert version == io.CHECKPOINT_VERSION and content["epoch"] == 3


def test_model_file_format_unchanged(tmp_path):
  # tests/data/tiny_model_v1.eqm was written by eqattn before the container was shared with
  # checkpoints (tests/conftest.py's tiny molecule model); writing it back gives the same
  # header and the same content, plus the config options added since, at their values for
  # files written before them (which is what loading gave it)
  old = Path(__file__).parent / "data" / "tiny_model_v1.eqm"
  pot = pt.load(old)
  assert pot.species == (1, 6, 8) and pot.metadata == {"a": [1, 2], "b": "x"}
  pot.save(tmp_path / "again.eqm")
  new_bytes, old_bytes = (tmp_path / "again.eqm").read_bytes(), old.read_bytes()
  assert new_bytes[: len(io.MAGIC) + 4] == old_bytes[: len(io.MAGIC) + 4]  # magic and version
  read = lambda p: io.read(p, magic=io.MAGIC, versions=(io.FORMAT_VERSION,), what="model")[1]
  again, before = read(tmp_path / "again.eqm"), read(old)
  added = set(again["config"]) - set(before["config"])
  at_old_values = {"radial_mlp": 0, "readout_heads": 1, "committee": 1, "force_heads": False}
  at_old_values.update(electrostatics=False, charge_width=1.0, ewald_accuracy=1e-6)
  at_old_values.update(charge_transfer=False)
  assert added <= set(at_old_values) and all(again["config"][k] == at_old_values[k] for k in added)
  assert {k: v for k, v in again["config"].items() if k not in added} == before["config"]
  # everything else byte for byte: with the old config, the content encodes to the old file
  assert (
    io.encode({**again, "config": before["config"]}, magic=io.MAGIC, version=io.FORMAT_VERSION)
    == old_bytes
  )
  for name in pt.shipped_models():
    assert pt.load(name).species


def test_elements_vocabulary():
  assert elements.symbol(29) == "Cu" and elements.symbol(0) == "Z=0"
  assert elements.atomic_number("O") == 8 and elements.atomic_number(8) == 8
  assert elements.species_list(["H", 6, "O"]) == (1, 6, 8)
  for bad in (["H", "H"], [], ["Xx"], [200]):
    with pytest.raises(ValueError):
      elements.species_list(bad)
  table = elements.species_table((1, 6, 8))
  np.testing.assert_array_equal(
    elements.species_indices(table, np.array([8, 1, 6]), (1, 6, 8)), [2, 0, 1]
  )
  with pytest.raises(pt.UnknownElementError, match=r"Cu \(Z=29\).*knows H, C, O"):
    elements.species_indices(table, np.array([1, 29]), (1, 6, 8))
  # old homes still work
  from potentials.potential import ELEMENTS, UnknownElementError, element_symbol, pair_vectors

  assert UnknownElementError is pt.UnknownElementError and element_symbol(1) == "H"
  assert ELEMENTS[8] == "O" and pair_vectors is pt.ops.pair_vectors


def test_old_io_names_still_work(tmp_path):
  with pytest.warns(DeprecationWarning, match="potentials.load"):
    old_load = io.load
  with pytest.warns(DeprecationWarning, match="potentials.save"):
    old_save = io.save
  pot = pt.load(Path(__file__).parent / "data" / "tiny_model_v1.eqm")
  old_save(pot, tmp_path / "m.eqm")
  assert old_load(tmp_path / "m.eqm").species == pot.species
  with pytest.raises(AttributeError):
    io.nothing_here


def test_deprecated_io_load_and_save_still_work(tmp_path):
  import potentials

  pot = potentials.Potential.create(0, species=["H"], features=4, num_basis=4, num_iterations=1)
  path = tmp_path / "m.eqm"
  with pytest.warns(DeprecationWarning, match="potentials.io.save is deprecated"):
    io.save(pot, path)
  with pytest.warns(DeprecationWarning, match="potentials.io.load is deprecated"):
    again = io.load(path)
  assert again.species == pot.species
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    io.nothing  # noqa: B018
