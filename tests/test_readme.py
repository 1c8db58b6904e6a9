"""Every Python snippet in the README and the documentation pages runs as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# (page, snippet): a snippet shown on several pages (the README's quick starts) runs once
SNIPPETS = list(
  {
    code: (page.relative_to(ROOT), code)
    for page in reversed(PAGES)
    if "_build" not in page.parts and "generated" not in page.parts
    for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
  }.values()
)


# Tutorial snippets that compile a full-size model (20 s to 90 s each on 2 cores with a cold
# cache) run with -m slow: eight replicas of the shipped ethanol model, the default model's
# first calls, a 4-head model's uncertainty, and a learning loop (tests/test_learn.py runs the
# same loop in the default selection). The README's own snippets always run.
HEAVY = (
  '[ase.build.molecule("CH3CH2OH")] * 8',
  "observables.compute(energies",
  "LearnOptions(",
  'pot.save("water.eqm")',
  "readout_heads=4, force_heads=True",
)


def _marks(page, code):
  heavy = page.name != "README.md" and any(h in code for h in HEAVY)
  return [pytest.mark.slow] if heavy else []


def test_readme_has_snippets():
  readme = re.findall(r"```python\n(.*?)```", PAGES[0].read_text(), flags=re.S)
  assert len(readme) >= 2 and all(any(code == s for _, s in SNIPPETS) for code in readme)


@pytest.mark.parametrize(
  "index",
  [
    pytest.param(i, marks=_marks(page, code), id=f"{page}-{i}")
    for i, (page, code) in enumerate(SNIPPETS)
  ],
)
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # snippets may write files
  page, code = SNIPPETS[index]
  scope = {"__name__": "__readme__"}
  exec(compile(code, f"{page} snippet", "exec"), scope)
  # test functions shown in the pages run too, with the fixtures our pytest plugin provides
  from plugin.testing import assert_energy_conserved

  fixtures = {"energy_conservation": assert_energy_conserved}
  for name, fn in list(scope.items()):
    if name.startswith("test_") and callable(fn):
      fn(**{arg: fixtures[arg] for arg in fn.__code__.co_varnames[: fn.__code__.co_argcount]})
