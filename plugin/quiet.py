"""One way to silence one known, harmless warning around a call (never a blanket filter)."""

from __future__ import annotations

import functools
import warnings
from typing import Callable


def quiet(message: str, category: type) -> Callable[[Callable], Callable]:
  """Decorator: ``fn`` with warnings of ``category`` whose text starts with ``message``
  ignored while it runs (for JAX-MD, while it traces); every other warning passes."""

  def decorate(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=category)
        return fn(*args, **kwargs)

    return wrapper

  return decorate
