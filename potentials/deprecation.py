"""Renamed names: the one home of how an old name keeps working, and until which version.

An old keyword or model-file key is mapped to its new name with a ``DeprecationWarning``
that names the replacement and :data:`REMOVAL`; the CHANGELOG lists every such name.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Mapping

REMOVAL = "0.3"  # the version that drops every name deprecated so far


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
  """One ``DeprecationWarning``: ``old`` is deprecated (removed in :data:`REMOVAL`), use ``new``."""
  msg = f"{old} is deprecated (removed in {REMOVAL}), use {new}"
  warnings.warn(msg, DeprecationWarning, stacklevel=stacklevel)


def rename_keys(kwargs: Mapping, old_to_new: Mapping[str, str], *, quiet: bool = False) -> dict:
  """``kwargs`` with each old key under its new name (a warning each, unless ``quiet``: model
  files written before a rename are not the user's code). Both names given is an error."""
  out = dict(kwargs)
  for old, new in old_to_new.items():
    if old not in out:
      continue
    if new in out:
      raise TypeError(f"{old}= and {new}= name the same thing; give only {new}=")
    if not quiet:
      warn(f"{old}=", f"{new}=", stacklevel=4)
    out[new] = out.pop(old)
  return out


def renamed(**old_to_new: str) -> Callable:
  """Decorator: the function also accepts the deprecated keyword names ``old=``."""

  def wrap(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
      return fn(*args, **rename_keys(kwargs, old_to_new))

    return inner

  return wrap


def renamed_fields(**old_to_new: str) -> Callable:
  """Class decorator (outside ``@dataclass``): the constructor also accepts old field names."""

  def wrap(cls):
    cls.__init__ = renamed(**old_to_new)(cls.__init__)
    return cls

  return wrap
