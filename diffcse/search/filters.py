"""Metadata filters (`where=`): checked strictly, then compiled to parameterised SQL over the store's JSON column.

    {"lang": "en"}                          equality (string, number or boolean)
    {"lang": {"in": ["en", "de"]}}          any of the values
    {"year": {"gte": 2000, "lt": 2010}}     ranges: gt, gte, lt, lte (numbers, or strings compared as text)
    {"lang": {"ne": "en"}}                  not equal (documents without the field match too)
    {"meta.source": "web"}                  a nested field, by a dotted path

Fields are AND-ed, and so are the operators given for one field. Comparisons are typed: the string
"2000" never equals the number 2000, and true never equals 1 (SQLite alone would say it does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffcse.search.errors import FilterError

OPERATORS = ("eq", "ne", "in", "gt", "gte", "lt", "lte")
RANGE_SQL = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# A field is a dotted path of identifiers: it becomes a JSON path ($.a.b) that needs no quoting,
# and anything else (quotes, brackets, '$') is refused rather than escaped.
FIELD_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
FIELD_RE = re.compile(FIELD_PATTERN)
MAX_FIELD_CHARS = 128
MAX_CONDITIONS = 32
MAX_IN_VALUES = 1024
_INT64 = 2**63 - 1
# SQL text below is built only from these constants; every value and path is a bound parameter.
_JSON_TYPES = {"text": "('text')", "number": "('integer', 'real')"}


@dataclass(frozen=True)
class Where:
    """A compiled filter: an SQL boolean expression over column `metadata`, and its parameters."""

    sql: str
    params: tuple


def _scalar(field: str, op: str, value: object) -> tuple[str, object]:
    """(type family, SQL value) of one condition value; an error names the field and operator."""
    where = f"where condition on {field!r}"
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > _INT64:
            raise FilterError(f"{where}: {op} value {value} is outside the 64-bit integer range")
        return "number", value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"{where}: {op} value {value!r} is not a finite number")
        return "number", value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FilterError(f"{where}: {op} value is not valid Unicode (a lone surrogate)") from None
        return "text", value
    shown = "null" if value is None else type(value).__name__
    raise FilterError(f"{where}: {op} value must be a string, number or boolean, got {shown}")


def _equal(path: str, family: str, value: object, params: list) -> str:
    """SQL true when the field holds exactly value (same JSON type)."""
    if family == "bool":
        params += [path, value]
        return "json_type(metadata, ?) = ?"
    params += [path, path, value]
    return f"(json_type(metadata, ?) IN {_JSON_TYPES[family]} AND json_extract(metadata, ?) = ?)"


def _condition(field: str, cond: object, params: list) -> list[str]:
    """SQL terms (to be AND-ed) for one field's condition."""
    path = "$." + field
    if not isinstance(cond, Mapping):
        return [_equal(path, *_scalar(field, "eq", cond), params)]
    if not cond:
        raise FilterError(f"where condition on {field!r}: empty operator object; use one of {', '.join(OPERATORS)}")
    terms = []
    for op, value in cond.items():
        if op not in OPERATORS:
            raise FilterError(f"where condition on {field!r}: unknown operator {op!r} (known: {', '.join(OPERATORS)})")
        if op == "eq":
            terms.append(_equal(path, *_scalar(field, op, value), params))
        elif op == "ne":
            # IFNULL: a document without the field (or without metadata) is "not equal" too.
            terms.append(f"NOT IFNULL({_equal(path, *_scalar(field, op, value), params)}, 0)")
        elif op == "in":
            terms.append(_one_of(field, value, params))
        else:
            family, sql_value = _scalar(field, op, value)
            if family == "bool":
                raise FilterError(f"where condition on {field!r}: {op} needs a number or a string, got a boolean")
            params += [path, path, sql_value]
            terms.append(f"(json_type(metadata, ?) IN {_JSON_TYPES[family]} AND json_extract(metadata, ?) {RANGE_SQL[op]} ?)")
    return terms


def _one_of(field: str, values: object, params: list) -> str:
    """SQL true when the field equals any of values (grouped by type, one IN list per type)."""
    if not isinstance(values, (list, tuple)) or not values:
        raise FilterError(f"where condition on {field!r}: 'in' needs a non-empty list of values")
    if len(values) > MAX_IN_VALUES:
        raise FilterError(f"where condition on {field!r}: 'in' has {len(values)} values; at most {MAX_IN_VALUES}")
    groups: dict[str, list] = {}
    for value in values:
        family, sql_value = _scalar(field, "in", value)
        groups.setdefault(family, []).append(sql_value)
    path = "$." + field
    parts = []
    for family, group in groups.items():
        marks = ", ".join("?" * len(group))
        if family == "bool":
            params += [path, *group]
            parts.append(f"json_type(metadata, ?) IN ({marks})")
        else:
            params += [path, path, *group]
            parts.append(f"(json_type(metadata, ?) IN {_JSON_TYPES[family]} AND json_extract(metadata, ?) IN ({marks}))")
    return "(" + " OR ".join(parts) + ")"


def check_field(field: object) -> str:
    """A field name as given, if it is a dotted path of identifiers; else an error naming it."""
    if not isinstance(field, str):
        raise FilterError(f"where: field names must be strings, got {type(field).__name__}")
    if len(field) > MAX_FIELD_CHARS or not FIELD_RE.fullmatch(field):
        shown = repr(field) if len(field) <= 60 else repr(field[:57]) + "..."
        raise FilterError(
            f"where: field {shown} is not a field name: letters, digits and '_' (not first), "
            f"'.' between nested names, at most {MAX_FIELD_CHARS} characters"
        )
    return field


def compile_where(where: Mapping[str, Any] | None) -> Where | None:
    """Check a where filter and compile it; None or {} means no filter."""
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise FilterError(f"where must be an object of field: condition, got {type(where).__name__}")
    if not where:
        return None
    if len(where) > MAX_CONDITIONS:
        raise FilterError(f"where has {len(where)} fields; at most {MAX_CONDITIONS}")
    params: list = []
    terms: list[str] = []
    for field, cond in where.items():
        terms += _condition(check_field(field), cond, params)
    return Where(" AND ".join(terms), tuple(params))
