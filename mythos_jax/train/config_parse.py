"""Config sections from mappings (YAML, JSON, ``--set``), typed, and tagged choices.

A :class:`Choice` is a section with one small dataclass per kind, as Levanter's registered
choices: the family's ``key`` field (``loops.schedule``, ``data.source``) picks the class, and a
field the chosen kind does not have is a one-line error naming it::

    loops: {schedule: curriculum, start_mean: 1, target: {schedule: poisson, mean: 6}}

``merge`` applies overrides; an override that changes a kind drops the fields of the old kind
that the new one lacks (``loops.schedule=fixed`` over a Poisson preset forgets its ``mean``).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, ClassVar

from mythos_jax.modes import Mode


class Choice:
    """Base of a family of tagged sections. The family's base sets ``key`` (the field naming
    the kind), ``noun`` (for errors) and ``default`` (the kind when ``key`` is absent); each
    subclass that sets the class attribute named by ``key`` is registered as that kind."""
    key: ClassVar[str]
    noun: ClassVar[str]
    default: ClassVar[str]
    kinds: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "key" in vars(cls):
            cls.kinds = {}
        elif cls.key in vars(cls):
            cls.kinds[str(getattr(cls, cls.key))] = cls

    def __post_init__(self) -> None:
        if not hasattr(type(self), self.key):
            raise TypeError(f"{type(self).__name__} is a family of sections: use one of "
                            f"{[cls.__name__ for cls in self.kinds.values()]}")

    def to_dict(self) -> dict[str, Any]:
        return {self.key: str(getattr(self, self.key)), **_field_values(self)}


def to_plain(value: Any) -> Any:
    """A config value as plain data: sections as dicts (a choice with its key first)."""
    if isinstance(value, Choice):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return _field_values(value)
    return copy.deepcopy(value)


def _field_values(section) -> dict[str, Any]:
    return {f.name: to_plain(getattr(section, f.name)) for f in dataclasses.fields(section)}


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def choose(cls, fields: dict[str, Any], path: str) -> type:
    """The class of ``cls``'s family that ``fields`` names (``cls`` if it is no choice)."""
    if not issubclass(cls, Choice):
        return cls
    kind = fields.get(cls.key, getattr(cls, cls.key, cls.default))
    chosen = cls.kinds.get(str(kind))
    if chosen is None or not issubclass(chosen, cls):
        allowed = [name for name, kind_cls in cls.kinds.items() if issubclass(kind_cls, cls)]
        raise ValueError(f"{path}{cls.key}: must be one of {allowed}, got {kind!r}")
    return chosen


def build(cls, fields: Any, path: str = ""):
    """Instantiate section ``cls`` (a choice: the kind ``fields`` names) from a mapping,
    coercing values to the field types; unknown keys and bad values raise ValueError naming
    ``path.field``."""
    if isinstance(fields, cls):
        return fields
    if not isinstance(fields, dict):
        raise ValueError(f"{path.rstrip('.') or 'config'}: expected a mapping, got {fields!r}")
    chosen = choose(cls, fields, path)
    if issubclass(cls, Choice):
        fields = {name: value for name, value in fields.items() if name != cls.key}
    known = field_names(chosen)
    unknown = sorted(set(fields) - known)
    if unknown and issubclass(cls, Choice):
        raise ValueError(f"{path}{unknown[0]}: not a field of the "
                         f"{str(getattr(chosen, cls.key))!r} {cls.noun} (its fields: "
                         f"{', '.join(sorted(known))})")
    if unknown:
        raise ValueError(f"{path.rstrip('.') or 'config'}: unknown field(s) {unknown}; known: "
                         f"{sorted(known)}")
    hints = typing.get_type_hints(chosen)
    return chosen(**{name: _coerce(hints[name], value, f"{path}{name}")
                     for name, value in fields.items()})


def merge(cls, base: dict[str, Any], changes: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``base`` with ``changes`` applied, section by section (see the module docstring)."""
    merged = dict(base)
    if issubclass(cls, Choice) and cls.key in changes:
        old, new = choose(cls, base, path), choose(cls, changes, path)
        if new is not old:
            merged = {name: value for name, value in base.items() if name in field_names(new)}
    hints = typing.get_type_hints(choose(cls, merged | changes, path)) if cls is not dict else {}
    for name, value in changes.items():
        kind = _section_type(hints.get(name))
        if isinstance(value, dict) and name in merged and kind is not None:
            if not isinstance(merged[name], dict):
                raise ValueError(f"{path}{name}: not a section, got {merged[name]!r}")
            value = merge(kind, merged[name], value, f"{path}{name}.")
        merged[name] = value
    return merged


def _section_type(kind) -> type | None:
    """The dataclass (or ``dict``) a field of type ``kind`` holds, None for a value."""
    if kind is dict or dataclasses.is_dataclass(kind):
        return kind
    return None


def _coerce(kind, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return _coerce(next(a for a in args if a is not type(None)), value, path)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], item, path) for item in items)
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return value
    return coerce_scalar(kind, value, path)


def coerce_scalar(kind, value: Any, path: str) -> Any:
    if isinstance(kind, type) and issubclass(kind, Mode):
        return kind.parse(value, path)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            number = float(value) if kind is float else int(str(value), 10)
            return number
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{path}: expected {kind.__name__}, got {value!r}")


def fail(field: str, rule: str) -> None:
    raise ValueError(f"TrainConfig.{field}: {rule}")
