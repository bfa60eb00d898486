"""The rule every export follows: proven on its own runtime before anything is written.

An exporter collects one `EquivalenceReport` per runtime it ran the artefact on (`proofs`: runtime -> report) and
calls `require_proven` before it moves anything into place; a failed proof raises `EquivalenceError` (exit 1)
with the failing runtime's summary, and the staged files are discarded.
"""

from __future__ import annotations

from cnnc.errors import EquivalenceError
from cnnc.runtime.equivalence import EquivalenceReport


def proofs_as_dict(proofs: dict[str, EquivalenceReport]) -> dict:
    return {runtime: {**report.as_dict(), "summary": report.summary()} for runtime, report in proofs.items()}


def require_proven(format_name: str, proofs: dict[str, EquivalenceReport]) -> None:
    failed = [f"on {runtime}: {report.summary()}" for runtime, report in proofs.items() if not report.passed]
    if failed:
        raise EquivalenceError(f"{format_name} export is not equivalent {'; '.join(failed)}; nothing written",
                               {"format": format_name, "proofs": proofs_as_dict(proofs)})
