"""cnnc's passes, one per module; importing this package registers them all.

Installed as `cnnc.passes` (pyproject maps it from the top-level `passes/` folder). Importing it as plain `passes`
from a checkout would create a second copy of every pass module and register every pass twice, so it refuses.
"""

if __name__ != "cnnc.passes":
    raise ImportError(f"import this package as cnnc.passes, not {__name__} (run from an installed cnnc)")

from cnnc.passes import fold_bn  # noqa: E402,F401
from cnnc.passes import remove_skip  # noqa: E402,F401
from cnnc.passes import collapse  # noqa: E402,F401
from cnnc.passes import destride  # noqa: E402,F401
from cnnc.passes import drop_blocks  # noqa: E402,F401
from cnnc.passes import schedule  # noqa: E402,F401  (last: it reorders nodes, later passes may not keep the order)

__all__ = ["fold_bn", "remove_skip", "collapse", "destride", "drop_blocks", "schedule"]
