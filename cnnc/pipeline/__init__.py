"""The pass infrastructure: the pass contract (`contract`), typed match results for per-node preconditions
(`match`), pipeline specs (`options`), ordering constraints (`order`), the housekeeping passes (`housekeeping`) and
the pass manager (`manager`). The passes themselves and their registry live in `cnnc.passes`."""
