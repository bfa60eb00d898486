"""The pass contract (after onnx-ir's `passes/common`, xDSL's `ModulePass` and onnxscript's rewriters).

A pass is a frozen dataclass with a class-level `name`, its options as fields, and `run(graph) -> PassResult`, which
rewrites the graphsurgeon graph in place and records what it did and what it skipped *and why*. Exact passes keep
the function up to float rounding; approximate passes are opt-in by name and report their measured deviation.

Passes register by name in one registry that refuses duplicates (a second copy of a pass module, imported under
another name, would otherwise shadow the first silently). Pipelines are written as `'destride{mode=network},collapse'`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_graphsurgeon as gs

from cnnc.errors import UsageError


@dataclass
class PassResult:
    """What one run of a pass did: `changed`, a line per rewrite in `applied`, a (where, why) per skip."""

    changed: bool = False
    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def did(self, what: str) -> None:
        self.changed = True
        self.applied.append(what)

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))

    def as_dict(self) -> dict:
        return {"changed": self.changed, "applied": list(self.applied),
                "skipped": [{"where": w, "why": y} for w, y in self.skipped], "stats": dict(self.stats)}


class Pass:
    """Base of every pass. Subclasses are `@dataclass(frozen=True)` and set `name`, `summary` and `exact`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    # Whether `cnnc compile` runs it when no --passes are given (exact passes that do not trade speed for size).
    default: ClassVar[bool] = True

    def run(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    def spec(self) -> str:
        """The pipeline syntax that recreates this pass with its options."""
        options = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(options) + "}" if options else "")


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry; a second class under a taken name is an error."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no pass name")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"pass {cls.name} must be a frozen dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise RuntimeError(
            f"pass name '{cls.name}' is registered twice ({existing.__module__} and {cls.__module__}); "
            "was a pass module imported under a second name?")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name. Passes register when `cnnc.passes` is imported (the API and CLI do that);
    the core does not import it itself, to keep the dependency direction core <- passes."""
    return dict(_REGISTRY)


def default_pass_names() -> list[str]:
    return [name for name, cls in registered_passes().items() if cls.exact and cls.default]


_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _convert(pass_name: str, option: str, kind, text: str):
    """Convert the text of one option to its annotated type: bool, int, float, str, Literal[...] or Optional."""
    args = typing.get_args(kind)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes", "on")
        if kind in (int, float, str):
            return kind(text)
        if args and all(isinstance(a, str) for a in args):  # Literal["a", "b"]
            if text not in args:
                raise ValueError(text)
            return text
        if type(None) in args:  # Optional[int] / Optional[float]
            inner = next(a for a in args if a is not type(None))
            return None if text.lower() == "none" else inner(text)
    except ValueError:
        choices = f" (one of {', '.join(map(str, args))})" if args and all(isinstance(a, str) for a in args) else ""
        raise UsageError(f"pass {pass_name}: bad value {text!r} for option {option}{choices}") from None
    raise UsageError(f"pass {pass_name}: option {option} cannot be set from the command line")


def parse_pipeline(text: str | list) -> list[Pass]:
    """`'fold-bn,destride{mode=network}'` (or a list of names, specs and Pass objects) into pass instances."""
    if isinstance(text, (list, tuple)):
        passes: list[Pass] = []
        for item in text:
            passes.extend([item] if isinstance(item, Pass) else parse_pipeline(str(item)))
        return passes
    registry = registered_passes()
    passes = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _SPEC.match(text, position)
        if not match or match.end() == position:
            raise UsageError(f"cannot parse pass list at {text[position:]!r}; expected name{{key=value,...}},...")
        name, body = match.group(1), match.group(2)
        position = match.end()
        if name not in registry:
            raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(sorted(registry))}")
        cls = registry[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        options = {}
        for item in filter(None, (body or "").split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                known = ", ".join(fields) or "none"
                raise UsageError(f"pass {name}: unknown option {item.strip()!r} (options: {known})")
            options[key] = _convert(name, key, hints[key], value.strip())
        passes.append(cls(**options))
    return passes
