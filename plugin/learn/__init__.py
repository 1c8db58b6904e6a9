"""Active learning from any reference: a validated potential for the user's own system.

:func:`learn` (``eqattn learn``) seeds labels from rattled start structures, trains a shallow
ensemble, explores with batched MD replicas on the model over a ladder of temperatures,
labels the frames it is least sure of (kept diverse), fine-tunes, and repeats until a whole
round at the top temperature stays under the uncertainty target, or the label or time
budget is spent. The pieces, one idea each: :mod:`~plugin.learn.reference` (teachers),
:mod:`~plugin.learn.labels` (worker processes, a label file that loses nothing),
:mod:`~plugin.learn.seed`, :mod:`~plugin.learn.explore`, :mod:`~plugin.learn.select`,
:mod:`~plugin.learn.loop` (the rounds), :mod:`~plugin.learn.state` (resume),
:mod:`~plugin.learn.run` (the entry point and report), :mod:`~plugin.learn.command`
(``eqattn learn``).

Importing the package loads no JAX (the command's parser reads :class:`LearnOptions`);
:func:`learn` and what runs models load on first use.
"""

from .options import LearnOptions
from .reference import check_spec, reference_from_spec

_RUN = ("LearnResult", "learn", "read_test")  # in plugin.learn.run, which loads JAX

__all__ = ["LearnOptions", "check_spec", "reference_from_spec", *_RUN]


def __getattr__(name: str):
  if name in _RUN:
    from . import run

    return getattr(run, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
