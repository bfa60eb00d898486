"""Explaining one unit with the adjoint back-map (seed 003): its value as ⟨x,H_I⟩ + ⟨x_b,H_b⟩ at one input.

Reconstruction modes (§3.3, Algorithm 1). For a conv layer l with kernel w (c_out × c_in × r1 × r2) reading the
in-channel feature map F_{l−1} (the conv's input), the unit is the convolution *before its own bias*, as in
Eq. 3 and Eq. 14 (c = F ⊛ w):
    RM4  one out-channel i at one stride position s, per in-channel j, no in-ch merge: one hypersurface per j,
         H_{l,s,j,i} (Eq. 8); its value is the in-channel-j partial sum Σ_window F_j · w_{i,j}.
    RM3  RM4 summed over all stride positions (global pooling, Eq. 9–10): H_{l,j,i} = Σ_s H_{l,s,j,i}.
    RM2  RM4 merged over in-channels (Eq. 11): H_{l,s,i} = Σ_j H_{l,s,j,i}, the value of conv unit (i, s).
    RM1  both (Eq. 12): H_{l,i} = Σ_s Σ_j H_{l,s,j,i}.
Global pooling is the sum over positions, as Algorithm 1 writes it (`sum(H, axis=(h, w))`).
    RM0  a fully connected output (Eq. 13). cnnc explains the unit's value as it is, own bias included (so H_b has
         a 1 at that bias), and allows it for any tensor, not only FC outputs.
Relative error (Eq. 16): |ĉ − c| / |c|, with c = 0 replaced by the smallest normal float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cnnc.analysis.backmap import MODES, BackMap, Bias, relative_error
from cnnc.errors import UsageError
from cnnc.ir import constant_value, is_empty_input


@dataclass(frozen=True)
class Unit:
    """A unit to explain: tensor `tensor`, per-sample multi-index `index` (channel first for a conv output)."""

    tensor: str
    index: tuple[int, ...]
    mode: str


@dataclass
class Explanation:
    unit: Unit
    true_value: float  # for RM4 / RM3: the sum over in-channels (= the RM2 / RM1 value)
    reconstructed_value: float
    relative_error: float
    H_I: np.ndarray  # input-shaped; (c_in, *input) for RM4 / RM3
    H_b: np.ndarray  # (len(x_b),); (c_in, len(x_b)) for RM4 / RM3
    x: np.ndarray
    x_b: np.ndarray
    biases: list[Bias]
    parts: list[dict] = field(default_factory=list)  # RM4 / RM3: per in-channel true, reconstructed, error
    notes: list[str] = field(default_factory=list)

    def as_dict(self, include_arrays: bool = True) -> dict:
        payload = {
            "unit": {"tensor": self.unit.tensor, "index": list(self.unit.index)}, "mode": self.unit.mode,
            "true_value": self.true_value, "reconstructed_value": self.reconstructed_value,
            "relative_error": self.relative_error,
            "input_term": float(np.sum(self.x * self.H_I.reshape((-1,) + self.x.shape).sum(0))),
            # A network without biases has an empty x_b: its bias term is 0 (reshape(-1, 0) cannot infer -1).
            "bias_term": float(np.dot(self.x_b, self.H_b.reshape(-1, self.x_b.size).sum(0))) if self.x_b.size else 0.0,
            "parts": self.parts, "notes": self.notes, "biases": [b.as_dict() for b in self.biases],
            "H_I_shape": list(self.H_I.shape), "H_b_shape": list(self.H_b.shape),
        }
        if include_arrays:
            payload.update({"H_I": self.H_I.tolist(), "H_b": self.H_b.tolist(), "x_b": self.x_b.tolist()})
        return payload


def parse_unit(text: str) -> tuple[str, tuple[int, ...]]:
    """`'output:3'` or `'TENSOR:c,y,x'` into (tensor name, indices)."""
    name, sep, indices = text.rpartition(":")
    try:
        index = tuple(int(part) for part in indices.split(","))
    except ValueError:
        index = ()
    if not sep or not name or not index or any(i < 0 for i in index):
        raise UsageError(f"bad --unit {text!r}; expected output:K or TENSOR:c,y,x with non-negative integers")
    return name, index


def explain_unit(backmap: BackMap, sample: np.ndarray, unit_text: str, mode: str | None = None,
                 vectorize: bool = True) -> Explanation:
    """Explain one unit (`output:K` or `TENSOR:c,y,x`) at one input sample."""
    name, index = parse_unit(unit_text)
    tensor = backmap.resolve_tensor(name)
    mode = (mode or backmap.default_mode(tensor)).upper()
    if mode not in MODES:
        raise UsageError(f"unknown --mode {mode}; choose one of {', '.join(MODES)}")
    x = backmap.as_batch(sample)
    if x.shape[0] != 1:
        raise UsageError(f"explain takes one input sample, got a batch of {x.shape[0]} (use the data-set mode)")
    if mode == "RM0":
        return _explain_value(backmap, x, tensor, index)
    return _explain_conv(backmap, x, tensor, index, mode, vectorize)


def _explain_value(backmap: BackMap, x: torch.Tensor, tensor: str, index: tuple[int, ...]) -> Explanation:
    nodes = backmap.cone([tensor])
    backmap.check(nodes)
    function = backmap.function(nodes, [tensor])
    with torch.no_grad():
        value = function(x, *backmap.bias_values)[0][0]
    flat = _flat_index(index, tuple(value.shape), tensor)
    cotangent = torch.zeros(value.numel(), dtype=backmap.dtype)
    cotangent[flat] = 1
    h_i, h_b = backmap.vjp(function, x, cotangent.reshape((1, 1) + tuple(value.shape)))
    true = float(value.reshape(-1)[flat])
    recon = float(backmap.reconstruct(x, h_i, h_b)[0, 0])
    unit = Unit(tensor, tuple(int(i) for i in np.unravel_index(flat, tuple(value.shape))), "RM0")
    return Explanation(unit, true, recon, float(relative_error(recon, true)), h_i[0, 0].numpy(),
                       h_b[0, 0].numpy(), x[0].numpy(), backmap.x_b, backmap.biases)


def _explain_conv(backmap: BackMap, x, tensor, index, mode, vectorize) -> Explanation:
    conv = backmap.producer.get(tensor)
    if conv is None or conv.op != "Conv":
        raise UsageError(f"{mode} explains a convolution unit; '{tensor}' is produced by "
                         f"{conv.op if conv is not None else 'no node'} (use RM0 for any tensor)")
    source = conv.inputs[0].name
    nodes = backmap.cone([source])
    backmap.check(nodes + [conv])
    function = backmap.function(nodes, [source])
    with torch.no_grad():
        feature_map = function(x, *backmap.bias_values)[0]  # F_{l-1}: (1, c_in, ...)
    pre_bias = backmap.pre_bias_conv(conv)
    leaf = feature_map.clone().requires_grad_(True)
    conv_out = pre_bias(leaf)[0]
    pooled = mode in ("RM1", "RM3")
    channel = index[0]
    spatial = index[1:]
    if channel >= conv_out.shape[1]:
        raise UsageError(f"channel {channel} out of range: '{tensor}' has {conv_out.shape[1]} channels")
    if pooled:
        target = conv_out[0, channel].sum()
        unit_index = (channel,)
    else:
        if len(spatial) != conv_out.dim() - 2:
            raise UsageError(f"{mode} needs TENSOR:c,{','.join('yxz'[:conv_out.dim() - 2])} for '{tensor}'")
        if any(s >= d for s, d in zip(spatial, conv_out.shape[2:])):
            raise UsageError(f"position {spatial} out of range for '{tensor}' of spatial size "
                             f"{tuple(conv_out.shape[2:])}")
        target = conv_out[(0, channel) + tuple(spatial)]
        unit_index = (channel,) + tuple(spatial)
    # The kernel back-mapped onto F_{l-1}: c = ⟨F_{l-1}, cot⟩ exactly, since the conv is linear in its input.
    cotangent = torch.autograd.grad(target, leaf)[0][0].detach()
    true = float(target.detach())
    per_channel = mode in ("RM3", "RM4")
    if per_channel:
        group = int(conv.attrs.get("group", 1))
        per_group = feature_map.shape[1] // group
        first = (channel // (conv_out.shape[1] // group)) * per_group
        channels = list(range(first, first + per_group))
        cotangents = torch.zeros((len(channels),) + tuple(cotangent.shape), dtype=backmap.dtype)
        for k, j in enumerate(channels):
            cotangents[k, j] = cotangent[j]
    else:
        cotangents = cotangent[None]
    h_i, h_b = backmap.vjp(function, x, cotangents[None], vectorize=vectorize)
    recon_parts = backmap.reconstruct(x, h_i, h_b)[0]
    recon = float(recon_parts.sum())
    parts = []
    if per_channel:
        for k, j in enumerate(channels):
            part_true = float((feature_map[0] * cotangents[k]).sum())
            part_recon = float(recon_parts[k])
            parts.append({"in_channel": j, "true_value": part_true, "reconstructed_value": part_recon,
                          "relative_error": float(relative_error(part_recon, part_true))})
        h_i_out, h_b_out = h_i[0].numpy(), h_b[0].numpy()
    else:
        h_i_out, h_b_out = h_i[0, 0].numpy(), h_b[0, 0].numpy()
    bias = conv.inputs[2] if len(conv.inputs) > 2 and not is_empty_input(conv.inputs[2]) else None
    notes = [f"the unit is conv '{conv.name}' before its own bias (c = F ⊛ w, seed 003 Eq. 3 / Eq. 14)"]
    if bias is not None and not pooled:
        notes.append(f"its output '{tensor}' at this position adds bias "
                     f"{float(np.asarray(constant_value(bias)).reshape(-1)[channel]):.6g}")
    if pooled:
        notes.append("global pooling is the sum over all stride positions (Algorithm 1)")
    return Explanation(Unit(tensor, unit_index, mode), true, recon, float(relative_error(recon, true)),
                       h_i_out, h_b_out, x[0].numpy(), backmap.x_b, backmap.biases, parts, notes)


def _flat_index(index: tuple[int, ...], shape: tuple[int, ...], tensor: str) -> int:
    size = int(np.prod(shape, dtype=np.int64))
    if len(index) == 1 and len(shape) != 1:
        flat = index[0]
    elif len(index) == len(shape):
        if any(i >= d for i, d in zip(index, shape)):
            raise UsageError(f"index {index} out of range for '{tensor}' of per-sample shape {shape}")
        flat = int(np.ravel_multi_index(index, shape))
    else:
        raise UsageError(f"'{tensor}' has per-sample shape {shape}: give one flat index or {len(shape)} indices")
    if flat >= size:
        raise UsageError(f"index {flat} out of range for '{tensor}' with {size} units per sample")
    return flat
