"""Analysis tools: perturbation from identity (seed 001) and the adjoint back-map (seed 003)."""
