"""Strict checks of request bodies against an official SDK's TypedDict request types.

pydantic validates TypedDicts leniently (unknown keys ignored, iterables checked lazily), which
would let a misspelt field pass. This walks the SDK's own type hints instead and reports every
unknown key, missing required key, wrong literal and wrong scalar type, so a stand-in can answer
such a body with the provider's 400, exactly where the real API would reject it.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pydantic
import typing_extensions
from typing_extensions import get_type_hints, is_typeddict

_SEQUENCES = {
    list,
    collections.abc.Iterable,
    collections.abc.Sequence,
    typing.Iterable,
    typing.Sequence,
    typing.List,  # noqa: UP006 - matched as a runtime origin, not used as an annotation
}
_MAPPINGS = {dict, collections.abc.Mapping, typing.Dict}  # noqa: UP006
_STRIP = {
    typing.Required,
    typing.NotRequired,
    typing.Annotated,
    typing_extensions.Required,
    typing_extensions.NotRequired,
    typing_extensions.ReadOnly,
    typing_extensions.Annotated,
}


def problems(value: object, tp: Any, where: str = "body") -> list[str]:
    """Every way `value` does not conform to the type `tp` (empty when it conforms)."""
    origin = get_origin(tp)
    if origin in _STRIP:
        return problems(value, get_args(tp)[0], where)
    if tp is Any or tp is object:
        return []
    if tp is None or tp is type(None):
        return [] if value is None else [f"{where}: expected null"]
    if origin in (Literal, typing_extensions.Literal):
        allowed = get_args(tp)
        return [] if value in allowed else [f"{where}: {value!r} is not one of {list(allowed)}"]
    if origin in (Union, types.UnionType):
        return _union(value, get_args(tp), where)
    if is_typeddict(tp):
        return _typed_dict(value, tp, where)
    if origin in _SEQUENCES or tp in _SEQUENCES:
        if not isinstance(value, list):
            return [f"{where}: expected an array"]
        (item,) = get_args(tp) or (Any,)
        found: list[str] = []
        for index, element in enumerate(value):
            found += problems(element, item, f"{where}[{index}]")
        return found
    if origin in _MAPPINGS or tp in _MAPPINGS:
        return [] if isinstance(value, dict) else [f"{where}: expected an object"]
    if tp is str:
        return [] if isinstance(value, str) else [f"{where}: expected a string"]
    if tp is bool:
        return [] if isinstance(value, bool) else [f"{where}: expected a boolean"]
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer"]
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number"]
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return _model(value, tp, where)
    if tp in (bytes, typing.IO) or origin is type:
        return []  # files and raw bytes never appear in a JSON body we check
    return []  # types this checker does not know are accepted rather than guessed at


def _typed_dict(value: object, tp: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({tp.__name__})"]
    hints = get_type_hints(tp, include_extras=True)
    found = [f"{where}.{key}: unknown field of {tp.__name__}" for key in value if key not in hints]
    found += [
        f"{where}.{key}: required field of {tp.__name__} is missing"
        for key in tp.__required_keys__
        if key not in value
    ]
    for key, element in value.items():
        if key in hints:
            found += problems(element, hints[key], f"{where}.{key}")
    return found


def _model(value: object, tp: type[pydantic.BaseModel], where: str) -> list[str]:
    """SDK response models accepted where request params are (e.g. content blocks)."""
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({tp.__name__})"]
    fields = tp.model_fields
    found = [f"{where}.{key}: unknown field of {tp.__name__}" for key in value if key not in fields]
    for name, info in fields.items():
        if name in value:
            found += problems(value[name], info.annotation, f"{where}.{name}")
        elif info.is_required():
            found.append(f"{where}.{name}: required field of {tp.__name__} is missing")
    return found


def _union(value: object, options: tuple[Any, ...], where: str) -> list[str]:
    results = [problems(value, option, where) for option in options]
    if any(not r for r in results):
        return []
    if isinstance(value, dict) and "type" in value:
        # Report against the alternative the value says it is, when one says so.
        for option, result in zip(options, results, strict=True):
            declared = _declared_type(option)
            if declared is not None and value["type"] in _literal_values(declared):
                return result
    shaped = [r for option, r in zip(options, results, strict=True) if _same_shape(value, option)]
    return min(shaped or results, key=len)


def _same_shape(value: object, tp: Any) -> bool:
    """Whether `tp` is the kind of type `value` could be (object, array, scalar)."""
    while get_origin(tp) in _STRIP:
        tp = get_args(tp)[0]
    origin = get_origin(tp)
    if isinstance(value, dict):
        model = isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)
        return is_typeddict(tp) or model or origin in _MAPPINGS or tp in _MAPPINGS
    if isinstance(value, list):
        return origin in _SEQUENCES or tp in _SEQUENCES
    return not (is_typeddict(tp) or origin in _SEQUENCES or origin in _MAPPINGS)


def _declared_type(option: Any) -> Any:
    if is_typeddict(option):
        return get_type_hints(option, include_extras=True).get("type")
    if isinstance(option, type) and issubclass(option, pydantic.BaseModel):
        field = option.model_fields.get("type")
        return field.annotation if field is not None else None
    return None


def _literal_values(tp: Any) -> tuple[Any, ...]:
    while get_origin(tp) in _STRIP:
        tp = get_args(tp)[0]
    return get_args(tp) if get_origin(tp) in (Literal, typing_extensions.Literal) else ()
