"""The back-map over a data set (seed 003, Tables 3–4): per layer, the share of units it reconstructs exactly.

Data-set mode (Tables 3–4): for every conv layer (RM2 units, all positions and channels) and every graph output
(RM0), the share of units whose reconstruction is within 1 % over N inputs. ⟨[x; x_b], H_u⟩ for all units u of a
layer at once is the Jacobian–vector product J·[x; x_b] (the same H, contracted in forward mode), so the table is
one JVP per chunk of inputs; `explicit_units` additionally reconstructs random units per layer from explicit
reverse-mode H and reports them apart.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnc.analysis.backmap import BackMap, relative_error
from cnnc.eval import SubgraphFunction


def dataset_table(backmap: BackMap, samples: np.ndarray, threshold: float = 0.01, chunk: int = 16,
                  explicit_units: int = 0, explicit_outputs: bool = False, seed: int = 0) -> dict:
    """Per layer, the share of units reconstructed within `threshold` over all `samples` (Tables 3–4)."""
    convs = backmap.conv_layers()
    outputs = [t.name for t in backmap.graph.outputs]
    dense = [n for n in backmap.nodes if n.op in ("Gemm", "MatMul") and n.outputs[0].name in backmap.data
             and n.outputs[0].name not in outputs]  # hidden fully connected layers, explained whole (RM0)
    backmap.check(backmap.nodes)
    sources = list(dict.fromkeys(c.inputs[0].name for c in convs))
    function = backmap.function(backmap.nodes, sources + [n.outputs[0].name for n in dense] + outputs)
    pre_bias = [backmap.pre_bias_conv(c) for c in convs]
    layers = [{"layer": i, "kind": "conv", "node": c.name, "tensor": c.outputs[0].name, "mode": "RM2",
               "first_layer": c.inputs[0].name == backmap.input.name} for i, c in enumerate(convs)]
    layers += [{"layer": len(convs) + i, "kind": "FC (hidden)", "node": n.name, "tensor": n.outputs[0].name,
                "mode": "RM0", "first_layer": n.inputs[0].name == backmap.input.name} for i, n in enumerate(dense)]
    for name in outputs:
        producer = backmap.producer.get(name)
        layers.append({"layer": len(layers), "kind": "FC" if producer is not None and producer.op in (
            "Gemm", "MatMul") else "output", "node": producer.name if producer is not None else "",
            "tensor": name, "mode": "RM0", "first_layer": False})
    stats = [{"units": 0, "within": 0, "max": 0.0, "sum": 0.0, "max_abs": 0.0, "scale": 0.0} for _ in layers]
    x_all = backmap.as_batch(samples)
    biases = list(backmap.bias_values)
    for start in range(0, x_all.shape[0], chunk):
        x = x_all[start:start + chunk]
        values, tangents = torch.func.jvp(lambda xs, *bs: function(xs, *bs), (x, *biases), (x, *biases))
        by_name = dict(zip(function.output_names, zip(values, tangents)))
        with torch.no_grad():
            pairs = [(fn(by_name[c.inputs[0].name][0])[0], fn(by_name[c.inputs[0].name][1])[0])
                     for c, fn in zip(convs, pre_bias)]
            pairs += [by_name[n.outputs[0].name] for n in dense] + [by_name[name] for name in outputs]
        for stat, (true, recon) in zip(stats, pairs):
            errors = relative_error(recon.detach().numpy(), true.detach().numpy())
            stat["units"] += errors.size
            stat["within"] += int((errors <= threshold).sum())
            stat["max"] = max(stat["max"], float(errors.max()) if errors.size else 0.0)
            stat["sum"] += float(errors.sum())
            stat["max_abs"] = max(stat["max_abs"], float((recon - true).abs().max()) if errors.size else 0.0)
            stat["scale"] = max(stat["scale"], float(true.abs().max()) if errors.size else 0.0)
    for layer, stat in zip(layers, stats):
        layer.update({"units": stat["units"], "units_per_input": stat["units"] // max(x_all.shape[0], 1),
                      "within_percent": 100.0 * stat["within"] / max(stat["units"], 1),
                      "max_relative_error": stat["max"], "mean_relative_error": stat["sum"] / max(
                          stat["units"], 1),
                      # the worst error against the layer's scale: Eq. 16 divides by |c|, which is tiny
                      # where c is a near-cancellation, so its maximum says little about the identity.
                      "max_abs_error_over_max_abs_value": stat["max_abs"] / stat["scale"] if stat["scale"]
                      else 0.0})
    if explicit_units or explicit_outputs:
        _explicit_checks(backmap, x_all, convs + dense, layers, explicit_units, explicit_outputs, seed, chunk)
    return {"inputs": int(x_all.shape[0]), "threshold": threshold, "x_b_size": int(backmap.x_b.size),
            "layers": layers}


def _explicit_checks(backmap: BackMap, x_all, inner, layers, units_per_layer, all_outputs, seed, chunk) -> None:
    """Reconstruct units from explicit reverse-mode H (the back-map itself) and record the worst error:
    `units_per_layer` random units per input of every conv (pre-bias, RM2) and hidden dense layer (RM0) in
    `inner`, and every unit of every graph output (RM0)."""
    generator = np.random.default_rng(seed)
    checks = []
    if units_per_layer:
        checks += [(layer, node) for layer, node in zip(layers, inner)]
    if all_outputs:
        checks += [(layer, None) for layer in layers[len(inner):]]
    for layer, node in checks:
        conv = node if node is not None and node.op == "Conv" else None
        source = conv.inputs[0].name if conv is not None else layer["tensor"]
        function = backmap.function(backmap.cone([source]), [source])
        pre_bias = backmap.pre_bias_conv(conv) if conv is not None else None
        worst, count = 0.0, 0
        for start in range(0, x_all.shape[0], chunk):
            x = x_all[start:start + chunk]
            with torch.no_grad():
                values = function(x, *backmap.bias_values)[0]
            if node is None:  # every output unit: one cotangent per unit
                per_sample = tuple(values.shape[1:])
                units = int(np.prod(per_sample))
                eye = torch.eye(units, dtype=backmap.dtype).reshape((units,) + per_sample)
                cotangents = eye[None].expand((x.shape[0],) + eye.shape).contiguous()
                true = values.reshape(x.shape[0], -1).numpy()
            else:
                cotangents, true = _random_unit_cotangents(pre_bias, values, units_per_layer, generator)
            h_i, h_b = backmap.vjp(function, x, cotangents)
            errors = relative_error(backmap.reconstruct(x, h_i, h_b).numpy(), true)
            worst, count = max(worst, float(errors.max())), count + errors.size
        layer.update({"explicit_units": count, "explicit_max_relative_error": worst})


def _random_unit_cotangents(pre_bias: SubgraphFunction | None, values: torch.Tensor, units: int,
                            generator: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """For `units` random units per sample of `pre_bias(values)` (a conv before its bias), or of `values` itself
    when `pre_bias` is None: the unit's gradient with respect to `values` (for a conv, its kernel back-mapped onto
    the conv input) as cotangents (N, units, *values.shape[1:]), and the units' values (N, units)."""
    leaf = values.clone().requires_grad_(True)
    out = (pre_bias(leaf)[0] if pre_bias is not None else leaf).reshape(values.shape[0], -1)
    picks = generator.integers(0, out.shape[1], size=(values.shape[0], units))
    cotangents = torch.zeros((values.shape[0], units) + tuple(values.shape[1:]), dtype=values.dtype)
    true = np.zeros(picks.shape)
    for k in range(units):
        selected = out[np.arange(values.shape[0]), picks[:, k]]
        cotangents[:, k] = torch.autograd.grad(selected.sum(), leaf, retain_graph=True)[0].detach()
        true[:, k] = selected.detach().numpy()
    return cotangents, true
