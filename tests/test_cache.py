"""plugin.cache: where the persistent compilation cache lives, that it caches small programs,
and the CLI's --no-cache / EQATTN_CACHE_DIR."""

import json

import jax
import jax.numpy as jnp
import pytest

import plugin
from plugin import cache, cli


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv(cache.ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache.default_cache_dir() == tmp_path / "xdg" / "eqattn"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "eqattn"
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "mine"))
  assert cache.default_cache_dir() == tmp_path / "mine"
  for off in ("", "0", "off", "OFF", "false", "no"):
    monkeypatch.setenv(cache.ENV_VAR, off)
    assert cache.default_cache_dir() is None
    assert plugin.enable_compilation_cache() is None  # disabled: nothing changes


def test_enable_caches_small_programs(tmp_path, restore_jax_cache):
  folder = plugin.enable_compilation_cache(tmp_path / "xla")
  assert folder == (tmp_path / "xla").resolve() and folder.is_dir()
  assert jax.config.values["jax_compilation_cache_dir"] == str(folder)
  # A program that compiles in milliseconds is cached too (JAX's default floor is 1 s).
  jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.125)(jnp.arange(7.0)).block_until_ready()
  assert any(folder.iterdir())


@pytest.fixture
def model(tmp_path):
  import potentials

  path = str(tmp_path / "m.eqm")
  potentials.Potential.create(
    0,
    species=["H"],
    cutoff=2.0,
    features=4,
    max_degree=1,
    num_iterations=1,
    num_heads=1,
    num_basis=4,
  ).save(path)
  return path


def test_cli_cache_and_no_cache(model, monkeypatch, tmp_path, capsys, restore_jax_cache):
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "off-by-flag"))
  assert cli.main(["info", model, "--no-cache"]) == 0
  assert not (tmp_path / "off-by-flag").exists()
  capsys.readouterr()
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "on"))
  assert cli.main(["info", model, "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["species"] == ["H"]
  assert jax.config.values["jax_compilation_cache_dir"] == str((tmp_path / "on").resolve())
  md_help = cli.build_parser()._subparsers._group_actions[0].choices["md"].format_help()
  assert "--no-cache" in md_help and cache.ENV_VAR in md_help


def test_cli_cache_folder_unwritable(model, monkeypatch, tmp_path, capsys, restore_jax_cache):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  monkeypatch.setenv(cache.ENV_VAR, str(blocker / "xla"))
  assert cli.main(["info", model]) == 0  # runs without the cache, and says so
  assert "compilation cache off" in capsys.readouterr().err


def test_model_shapes_are_remembered_in_the_cache(model, tmp_path, restore_jax_cache):
  # the shapes a model file is checked against are traced once, then read from the cache;
  # the core only sees the memo it is given (no global state)
  import potentials
  from plugin.exported import json_memo

  plain = potentials.load(model)
  memo, calls = json_memo("param-shapes"), []

  def counting(key, compute):
    return memo(key, lambda: calls.append(key) or compute())

  folder = plugin.enable_compilation_cache(tmp_path / "xla")
  first = potentials.load(model, memo=counting)
  again = potentials.load(model, memo=counting)
  assert len(calls) == 1 and list((folder / "exported").glob("param-shapes-*.json"))
  for p in (first, again):
    assert jax.tree_util.tree_all(
      jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), p.params, plain.params)
    )


def test_one_registry_of_compiled_functions_least_recently_used_goes():
  from plugin.registry import Registry

  made = []
  reg = Registry(size=2)
  get = lambda kind, key: reg.get(kind, key, lambda: made.append((kind, key)) or (kind, key))
  assert get("a", 1) == ("a", 1) and get("a", 1) == ("a", 1) and made == [("a", 1)]
  get("b", 1)
  get("a", 1)  # used again: now the most recent
  get("c", 1)  # evicts ("b", 1), the least recently used
  assert len(reg) == 2 and len(made) == 3
  get("a", 1)
  assert len(made) == 3
  get("b", 1)
  assert made[-1] == ("b", 1) and len(made) == 4  # made again
  reg.clear("b")
  assert len(reg) == 1
