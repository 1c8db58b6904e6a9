"""Every Python snippet in the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # snippets may write files
  scope = {"__name__": "__readme__"}
  exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), scope)
  # test functions shown in the README run too, with the fixtures our pytest plugin provides
  from plugin.testing import assert_energy_conserved

  fixtures = {"energy_conservation": assert_energy_conserved}
  for name, fn in list(scope.items()):
    if name.startswith("test_") and callable(fn):
      fn(**{arg: fixtures[arg] for arg in fn.__code__.co_varnames[: fn.__code__.co_argcount]})
