"""Reports of the adjoint back-map (seed 003): the data-set table in the layout of the paper's Tables 3–4, and a
heat map of one unit's input hypersurface H_I."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnc.analysis.explain import Explanation


def format_dataset_table(table: dict, title: str = "") -> str:
    """A Markdown table in the layout of the paper's Tables 3–4 (one row per layer, ε_l = share within 1 %)."""
    explicit = any("explicit_units" in row for row in table["layers"])
    headers = ["layer", "node", "mode", "units / input", "units", "within 1 %", "max rel. error", "mean rel. error",
               "max abs. error / max abs. value"]
    if explicit:
        headers += ["explicit-H units", "explicit-H max rel. error"]
    lines = [f"### {title}", ""] if title else []
    lines += [(f"{table['inputs']} inputs; units with |ĉ − c| / |c| ≤ {100 * table['threshold']:g} % (Eq. 16); "
               f"x_b holds {table['x_b_size']} biases."), "",
              "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table["layers"]:
        label = f"ε{row['layer']}" + {"FC": " (FC)", "FC (hidden)": " (FC, hidden)"}.get(row["kind"], "") + (
            " (first layer)" if row["first_layer"] else "")
        cells = [label, row["node"], row["mode"], str(row["units_per_input"]), str(row["units"]),
                 f"{row['within_percent']:.4f} %", f"{row['max_relative_error']:.3g}",
                 f"{row['mean_relative_error']:.3g}", f"{row['max_abs_error_over_max_abs_value']:.3g}"]
        if explicit:
            cells += [str(row.get("explicit_units", "")), f"{row['explicit_max_relative_error']:.3g}"
                      if "explicit_units" in row else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_hypersurface(explanation: Explanation, path: str | Path) -> None:
    """A heat map of H_I per input channel (and their sum), diverging around 0."""
    import matplotlib  # optional dependency (the `plot` extra): imported only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = explanation.H_I
    if explanation.unit.mode in ("RM3", "RM4"):
        h = h.sum(axis=0)  # merged over in-channels: the RM1 / RM2 hypersurface
    if h.ndim == 1:
        h = h[None, None]
    elif h.ndim == 2:
        h = h[:, None]
    panels = [h[c] for c in range(h.shape[0])] + ([h.sum(axis=0)] if h.shape[0] > 1 else [])
    titles = [f"channel {c}" for c in range(h.shape[0])] + (["sum over channels"] if h.shape[0] > 1 else [])
    panels = [p.reshape(p.shape[0], -1) if p.ndim > 2 else p for p in panels]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for axis, panel, title in zip(axes[0], panels, titles):
        limit = float(np.abs(panel).max()) or 1.0
        image = axis.imshow(panel, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto" if panel.shape[0] == 1
                            else "equal")
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    unit = explanation.unit
    figure.suptitle(f"H_I of {unit.tensor}{list(unit.index)} ({unit.mode}): true {explanation.true_value:.6g}, "
                    f"reconstructed {explanation.reconstructed_value:.6g}, rel. error "
                    f"{explanation.relative_error:.2g}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
