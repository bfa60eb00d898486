"""The cost model: what nodes cost onnxruntime (MACs, weight and activation bytes, kernels, its fusions), a roofline
per provider measured once per machine, and the verdict on a rewrite (pays, loses, close).

Passes weigh each candidate rewrite by `compare(nodes_cost(old), nodes_cost(new), roofline(provider,
measure=False), batches)` and record it as a `cnnc.pipeline.contract.Candidate` with `candidate_id(tensor names)`;
`chosen(verdict, id, apply_close)` says whether they apply it. `cnnc.cost.sketch` builds the nodes of a replacement
without its weights, so that a rewrite is priced before anything is computed.
"""

from cnnc.cost.measure import PROVIDERS, Roofline, built_in, cache_path, roofline
from cnnc.cost.model import Cost, constant_bytes, node_costs, node_macs, nodes_cost, tensor_bytes
from cnnc.cost.verdict import Verdict, candidate_id, chosen, compare

__all__ = ["PROVIDERS", "Cost", "Roofline", "Verdict", "built_in", "cache_path", "candidate_id", "chosen", "compare",
           "constant_bytes", "node_costs", "node_macs", "nodes_cost", "roofline", "tensor_bytes"]
