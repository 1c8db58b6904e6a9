"""Chemical elements and the model's species table.

Vocabulary (used the same way across ``potentials`` and ``plugin``):

* **atomic number** ``Z``: the element, ``1`` (H) to ``118`` (Og); ``0`` is no element.
* **species**: the atomic numbers a model knows, in the order of its table
  (``Potential.species``), and, where a function asks for ``species=`` per atom (e.g.
  ``plugin.jax_md.neighbor_list``), the atomic number of each atom.
* **species index**: the position of an atom's element in the model's species table, the
  integer the network embeds (``EnergyModel``'s first argument, ``Potential.species_index``).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

SYMBOLS = (
  "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge "
  "As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm "
  "Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U "
  "Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()
ELEMENTS = SYMBOLS  # the name potentials.potential used


class UnknownElementError(ValueError):
  """An atomic number that the model was not trained on."""


def symbol(z: int) -> str:
  """``"Cu"`` for 29; ``"Z=200"`` for a number that is no element."""
  return SYMBOLS[z] if 0 < z < len(SYMBOLS) else f"Z={z}"


def atomic_number(element: Union[int, str]) -> int:
  """The atomic number of a symbol (``"Cu"``) or of an integer in range; else ``ValueError``."""
  z = SYMBOLS.index(element) if isinstance(element, str) and element in SYMBOLS[1:] else element
  if not isinstance(z, (int, np.integer)) or not 0 < int(z) < len(SYMBOLS):
    raise ValueError(f"unknown species {element!r}: give atomic numbers or element symbols")
  return int(z)


def species_list(elements: Sequence[Union[int, str]]) -> Tuple[int, ...]:
  """A model's species (atomic numbers, in order) from symbols or numbers, checked."""
  zs = tuple(atomic_number(e) for e in elements)
  if len(set(zs)) != len(zs) or not zs:
    raise ValueError(f"species must be a non-empty list without repeats, got {list(elements)}")
  return zs


def species_table(species: Sequence[int]) -> np.ndarray:
  """``table[Z]`` = species index of element ``Z``, ``-1`` for elements not in ``species``."""
  table = np.full(len(SYMBOLS), -1, np.int32)
  table[list(species)] = np.arange(len(species), dtype=np.int32)
  return table


def species_indices(table: np.ndarray, atomic_numbers, species: Sequence[int]) -> np.ndarray:
  """Species index of each atom (``int32``) from its atomic number; unknown elements raise
  :class:`UnknownElementError` naming them and the ``species`` the model knows."""
  z = np.asarray(atomic_numbers)
  if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer):
    raise ValueError(f"atomic_numbers must be a 1-D integer array, got {z.dtype} {z.shape}")
  bad = (z <= 0) | (z >= len(SYMBOLS))
  idx = np.where(bad, -1, table[np.clip(z, 0, len(SYMBOLS) - 1)])
  if np.any(idx < 0):
    unknown = sorted({int(v) for v in z[idx < 0]})
    names = ", ".join(f"{symbol(v)} (Z={v})" for v in unknown)
    raise UnknownElementError(
      f"element(s) {names} not in this model; it knows {', '.join(symbol(s) for s in species)}"
    )
  return idx.astype(np.int32)
