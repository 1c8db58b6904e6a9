"""eqattn simulator adapters: neighbour lists, ASE calculator, JAX-MD energy functions."""
