"""Sphinx configuration of eqattn's documentation (``python3 -m sphinx -W -b html docs OUT``).

Markdown pages through MyST, the API reference from the docstrings (autodoc, autosummary,
napoleon for the Google-style sections), the command-line reference from ``eqattn``'s own
parser (sphinx-argparse).
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "eqattn"
author = "the eqattn developers"
copyright = "2026, the eqattn developers"
extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinxarg.ext",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "benchmarks/*.json"]
myst_heading_anchors = 3
autosummary_generate = True
# autosummary writes pages for what api.md lists but never deletes the pages of names no
# longer listed (a rename leaves an orphan page, which -W turns into an error): start clean
shutil.rmtree(pathlib.Path(__file__).parent / "generated", ignore_errors=True)
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings state shapes and units
napoleon_google_docstring = True
napoleon_use_ivar = True
html_theme = "alabaster"
html_title = "eqattn"
