"""The pass registry: lazy loaders by name, DEFAULT_PIPELINE and the ordering constraints, spec round-trips."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from cnnc.errors import UsageError
from cnnc.passes import DEFAULT_PIPELINE, ORDER_CONSTRAINTS, all_pass_classes, get_all_passes, get_pass, parse_pipeline
from cnnc.pipeline.contract import Pass
from cnnc.pipeline.order import order_notes

HOUSEKEEPING = ("canonicalize", "tidy", "refresh-shapes", "check-model")


@pytest.mark.parametrize("name", sorted(get_all_passes()))
def test_each_loader_returns_a_frozen_pass_class_of_its_name(name):
    cls = get_all_passes()[name]()
    assert issubclass(cls, Pass) and cls.name == name
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert cls.summary and cls.kind in ("exact", "approximate", "housekeeping")


def test_housekeeping_is_registered_by_name_and_kind():
    assert all(get_pass(name).kind == "housekeeping" for name in HOUSEKEEPING)
    assert get_pass("fold-bn").kind == "exact" and get_pass("drop-blocks").kind == "approximate"


def test_unknown_pass_is_a_usage_error_listing_the_known_ones():
    with pytest.raises(UsageError, match="unknown pass 'nope'; known passes: .*fold-bn"):
        get_pass("nope")


def _non_default(field: dataclasses.Field, kind) -> str:
    """A text value other than the field's default, of the field's type."""
    args = typing.get_args(kind)
    if kind is bool:
        return str(not field.default).lower()
    if kind is int:
        return str(field.default + 3)
    if kind is float:
        return repr(field.default * 0.5 + 0.25)
    if args and all(isinstance(a, str) for a in args):  # Literal
        return next(a for a in args if a != field.default)
    if type(None) in args:  # Optional[int|float]
        inner = next(a for a in args if a is not type(None))
        return "none" if field.default is not None else str(inner(2))
    return "some-text"  # str


@pytest.mark.parametrize("name", sorted(get_all_passes()))
def test_every_pass_round_trips_through_its_spec(name):
    cls = get_pass(name)
    default = cls()
    assert parse_pipeline(default.spec()) == [default] and default.spec() == name
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if not fields:
        return
    body = ",".join(f"{f.name}={_non_default(f, hints[f.name])}" for f in fields)
    (configured,) = parse_pipeline(f"{name}{{{body}}}")
    assert all(getattr(configured, f.name) != f.default for f in fields)
    assert parse_pipeline(configured.spec()) == [configured]


def test_default_pipeline_is_registered_exact_and_respects_every_constraint():
    assert DEFAULT_PIPELINE == ("simplify", "fold-bn", "remove-skip", "collapse", "schedule")
    assert all(get_pass(name).kind == "exact" for name in DEFAULT_PIPELINE)
    assert order_notes(DEFAULT_PIPELINE, ORDER_CONSTRAINTS) == []


def test_constraints_name_registered_passes():
    passes = all_pass_classes()
    for constraint in ORDER_CONSTRAINTS:
        assert constraint.before in passes and constraint.after in passes and constraint.why
    assert len({(c.before, c.after) for c in ORDER_CONSTRAINTS}) == len(ORDER_CONSTRAINTS)


def test_a_violated_order_gives_a_note_not_a_refusal():
    notes = order_notes(["collapse", "fold-bn", "schedule", "destride"], ORDER_CONSTRAINTS)
    assert any(note.startswith("collapse runs before fold-bn:") for note in notes)
    assert any(note.startswith("schedule runs before destride:") for note in notes)
    assert not any("remove-skip" in note for note in notes)
    assert [p.name for p in parse_pipeline("collapse,fold-bn")] == ["collapse", "fold-bn"]
