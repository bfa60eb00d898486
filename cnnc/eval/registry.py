"""The evaluator's handler registry, built from the op table: an op that `cnnc.ir.ops.OPS` gives the family F is
evaluated by `cnnc/eval/F.py`'s HANDLERS[op] and vetted by its REASONS[op] (attribute combinations it would not
reproduce exactly). Building the registry checks both directions: a table entry without its handler, and a handler
the table does not route to its module, stop the import with the op named.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from cnnc.eval import activations, arithmetic, conv, pool, resize, shape, tensor
from cnnc.eval.common import Handler, Reason
from cnnc.ir.ops import EVALUATED_OPS, OPS

FAMILIES = {module.__name__.rsplit(".", 1)[-1]: module
            for module in (activations, arithmetic, conv, pool, resize, shape, tensor)}


def table_mismatches() -> list[str]:
    """Each disagreement between the op table's `family` column and the family modules' HANDLERS and REASONS."""
    problems = []
    for name, module in FAMILIES.items():
        routed = {op for op, facts in OPS.items() if facts.family == name}
        problems += [f"{op}: the op table routes it to cnnc/eval/{name}.py, which has no handler"
                     for op in sorted(routed - module.HANDLERS.keys())]
        problems += [f"{op}: cnnc/eval/{name}.py handles it, but the op table does not route it there"
                     for op in sorted((module.HANDLERS.keys() | module.REASONS.keys()) - routed)]
    problems += [f"{op}: the op table names family {facts.family!r}, which is not a module of cnnc/eval"
                 for op, facts in sorted(OPS.items()) if facts.family is not None and facts.family not in FAMILIES]
    return problems


_MISMATCHES = table_mismatches()
if _MISMATCHES:
    raise ImportError("the op table (cnnc/ir/ops.py) and the evaluator's handlers disagree: " + "; ".join(_MISMATCHES))

HANDLERS: dict[str, Handler | None] = {op: FAMILIES[OPS[op].family].HANDLERS[op] for op in sorted(EVALUATED_OPS)}
REASONS: dict[str, Reason] = {op: reason for op in sorted(EVALUATED_OPS)
                              if (reason := FAMILIES[OPS[op].family].REASONS.get(op)) is not None}
SUPPORTED_OPS: frozenset[str] = EVALUATED_OPS


def unsupported_reason(node: gs.Node) -> str | None:
    """None when the evaluator reproduces `node` exactly (op and attributes); otherwise why it cannot."""
    if node.domain not in ("", "ai.onnx", None):
        return f"{node.op} is in custom domain {node.domain!r}"
    if node.op not in SUPPORTED_OPS:
        return f"{node.op} is not supported by the float64 evaluator"
    reason = REASONS.get(node.op)
    return None if reason is None else reason(node)
