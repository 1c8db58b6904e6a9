"""eqattn's neighbour lists, one package on shared image tables:

* :mod:`~plugin.neighbors.host`: full directed pair lists on the host (vesin), padded to
  capacity buckets, for the ASE calculator, LAMMPS and training data;
* :mod:`~plugin.neighbors.images`: JAX-MD neighbour lists with periodic images, for boxes
  narrower than twice the list cutoff (:func:`plugin.jax_md.neighbor_list` picks them);
* :mod:`~plugin.neighbors.replicas`: the pair lists of a batch of replicas
  (:mod:`plugin.md.replicas`);
* :mod:`~plugin.neighbors.cells`: what they share: boxes, their widths, the image shifts a
  cutoff reaches.

The host list's names are importable from here, as before the package existed.
"""

from plugin.neighbors import host
from plugin.neighbors.host import (  # noqa: F401  (re-exported: __all__ is host's)
  NeighborListBuilder,
  PaddedPairs,
  bucket_capacity,
  neighbor_pairs,
  neighbor_pairs_from_atoms,
  pad_pairs,
)

__all__ = list(host.__all__)
