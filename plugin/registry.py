"""One registry of compiled functions, with one eviction policy.

The programs eqattn compiles for a model (the calculators' shared evaluator, MD engines, batch
engines, the LAMMPS stages, a batch's uncertainty) are kept here by what they depend on, so a
second calculator, run or rank with the same model and shapes compiles nothing new. Beyond
``DEFAULTS.compiled_functions`` entries the least recently used goes (its XLA programs with it;
eqattn's persistent cache, when enabled, still holds them on disk).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Hashable, Optional

from plugin.defaults import DEFAULTS

__all__ = ["Registry", "COMPILED", "registered"]


class Registry:
  """Values made once per ``(kind, key)``, least recently used evicted beyond ``size``."""

  def __init__(self, size: int):
    self.size = size
    self._items: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()

  def get(self, kind: str, key: Hashable, make: Callable[[], Any]) -> Any:
    """The value of ``(kind, key)``, made by ``make()`` the first time."""
    k = (kind, key)
    if k in self._items:
      self._items.move_to_end(k)
      return self._items[k]
    value = make()
    self._items[k] = value
    while len(self._items) > self.size:
      self._items.popitem(last=False)
    return value

  def clear(self, kind: Optional[str] = None) -> None:
    """Forget every value (of ``kind``)."""
    for k in [k for k in self._items if kind is None or k[0] == kind]:
      del self._items[k]

  def __len__(self) -> int:
    return len(self._items)


COMPILED = Registry(DEFAULTS.compiled_functions)


def registered(kind: str) -> Callable[[Callable], Callable]:
  """Decorator: ``f(*args)`` (hashable arguments) made once per arguments in :data:`COMPILED`;
  ``f.cache_clear()`` forgets this kind."""

  def wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def get(*args):
      return COMPILED.get(kind, args, lambda: fn(*args))

    get.cache_clear = lambda: COMPILED.clear(kind)
    return get

  return wrap
