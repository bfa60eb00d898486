"""The `cnnc` command line (click): one module per command, assembled into the `cli` group in `cnnc.cli.app`.

The console script is `cnnc = "cnnc.cli:main"`. Shared pieces: `options` (the equivalence-check option group, batch
lists), `table` (the one text-table formatter), `outputs` (atomic report files via `cnnc.io.jsonio`, plots drawn
last so a missing matplotlib never throws the other files away).
"""

from cnnc.cli.app import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":  # pragma: no cover
    main()
