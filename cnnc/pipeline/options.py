"""Pipeline specs: `'fold-bn,destride{mode=network}'` (or a list of names, specs and Pass objects) into passes.

The registry is an argument (a mapping name -> loader returning the pass class, as `cnnc.passes.get_all_passes()`
gives): the core never imports the passes, and only the passes a spec names are loaded. Option values are converted
to the field's annotated type: bool, int, float, str, Literal[...] or Optional[int|float].
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping

from cnnc.errors import UsageError
from cnnc.pipeline.contract import Pass

Registry = Mapping[str, Callable[[], type[Pass]]]

_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(pass_name: str, option: str, kind, text: str):
    """Convert the text of one option to its annotated type."""
    args = typing.get_args(kind)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in _TRUE + _FALSE:
                raise ValueError(text)
            return lowered in _TRUE
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


def pass_class(name: str, registry: Registry) -> type[Pass]:
    """The class registered under `name`; an unknown name is the user's error and lists the known ones."""
    if name not in registry:
        raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(sorted(registry))}")
    return registry[name]()


def _instantiate(name: str, body: str | None, registry: Registry) -> Pass:
    cls = pass_class(name, registry)
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
    return cls(**options)


def parse_pipeline(text: str | list | tuple, registry: Registry) -> list[Pass]:
    """`'fold-bn,destride{mode=network}'` (or a list of names, specs and Pass objects) into pass instances."""
    if isinstance(text, (list, tuple)):
        passes: list[Pass] = []
        for item in text:
            passes.extend([item] if isinstance(item, Pass) else parse_pipeline(str(item), registry))
        return passes
    passes = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _SPEC.match(text, position)
        if not match or match.end() == position:
            raise UsageError(f"cannot parse pass list at {text[position:]!r}; expected name{{key=value,...}},...")
        passes.append(_instantiate(match.group(1), match.group(2), registry))
        position = match.end()
    return passes
