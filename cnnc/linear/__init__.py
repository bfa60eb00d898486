"""Linear algebra of networks: linear machines, their affine maps, conv equivalents and the hypergraph."""
