"""The pass infrastructure: the pass contract, pipeline specs and the pass manager."""
