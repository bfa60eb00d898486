"""The one text-table formatter of the command line, and the rows of a model's statistics.

Every aligned listing the commands print (compile's before/after table, inspect, verify, bench, `cnnc passes`,
`cnnc example`, `explain --list`, inspect's schedule peaks) goes through `table`, so columns line up the same way
everywhere: left-aligned, two spaces apart, no trailing blanks.
"""

from __future__ import annotations


def table(rows, headers=None) -> str:
    """Rows as left-aligned columns two spaces apart; with `headers`, a header line and a dashed rule first."""
    rows = [tuple(str(cell) for cell in row) for row in rows]
    shown = ([tuple(str(h) for h in headers)] if headers else []) + rows
    if not shown:
        return ""
    widths = [max(len(row[i]) for row in shown if i < len(row)) for i in range(max(len(row) for row in shown))]

    def line(cells) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    lines = [line(headers), "  ".join("-" * width for width in widths)] if headers else []
    return "\n".join(lines + [line(row) for row in rows])


def human(n: float) -> str:
    """1234567 -> '1.235M': four significant digits and a K/M/G/T/P suffix."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def stats_rows(before: dict, after: dict | None) -> list[tuple[str, str, str]]:
    """(figure, before, after) rows of two `cnnc.ir.stats.model_stats` dicts; `after` None leaves its column empty."""
    after = after or {}
    rows = [("nodes", str(before["nodes"]), str(after.get("nodes", "")))]
    for op in sorted(set(before["ops"]) | set(after.get("ops", {}))):
        rows.append((f"  {op}", str(before["ops"].get(op, 0)), str(after.get("ops", {}).get(op, 0)) if after else ""))
    rows += [
        ("parameters", human(before["parameters"]), human(after["parameters"]) if after else ""),
        ("MACs (batch 1)", human(before["macs"]), human(after["macs"]) if after else ""),
        ("depth (convs)", str(before.get("depth", "")), str(after.get("depth", "")) if after else ""),
        ("size (bytes)", human(before["size_bytes"]), human(after["size_bytes"]) if after else ""),
        ("IR / opset", f"{before['ir_version']} / {before['opsets'].get('ai.onnx', '-')}",
         f"{after['ir_version']} / {after['opsets'].get('ai.onnx', '-')}" if after else ""),
    ]
    for kind in ("inputs", "outputs"):
        for name, dims in before[kind].items():
            rows.append((f"{kind[:-1]} {name}", str(dims), str(after.get(kind, {}).get(name, "")) if after else ""))
    return rows
