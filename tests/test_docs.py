"""The documentation site builds cleanly: every page, the API reference from the docstrings
and the command-line reference from the parser, with warnings as errors."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    + ["-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  html = tmp_path / "html"
  for page in ("index", "installation", "tutorials/training", "api", "cli", "benchmarks"):
    assert (html / f"{page}.html").exists(), page
  # the API reference has the docstrings, the CLI reference the parser's options
  assert (
    "wall-clock budget" in (html / "generated" / "potentials.training.TrainConfig.html").read_text()
  )
  assert "--time-limit" in (html / "cli.html").read_text()
