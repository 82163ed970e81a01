"""Guided JSON that always closes within the token budget (`bound_schema`).

A schema that leaves strings, arrays, numbers or extra properties open lets a model (a random-weight
one for sure) write until `max_tokens` and return JSON cut in half. Every vocabulary token is at least
one byte, so a grammar whose every instance serialises in at most B bytes ends within B tokens, and
llguidance only offers tokens that can still be completed. `bound_schema(schema, B)` returns a schema
whose instances all validate against `schema` (it only narrows) and are at most B bytes long in the
compact form the grammar generates:

- strings get a `maxLength`, arrays a `maxItems`, integers and numbers bounds (numbers also
  `multipleOf: 0.01` when they have none: at most two decimals);
- objects with declared properties get `additionalProperties: false`; an object with none (as
  `{"type": "object"}`) keeps up to a few extra properties with short `[A-Za-z0-9_]` names and scalar
  values; any value (`{}` / `true`) becomes a short scalar;
- the caps start generous and halve until the longest instance fits (existing tighter bounds and
  `minLength` / `minItems` are kept).

Constructs whose length cannot be bounded this way (`$ref`, `allOf`, `not`, conditionals,
`prefixItems`, `x-guidance` options ...) leave the schema as given (`Unbounded`): such output can
still end at `max_tokens` with finish_reason "length", as before.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from typing import Any

_UNSUPPORTED = ("$ref", "allOf", "not", "if", "then", "else", "prefixItems", "additionalItems", "contains",
                "dependentSchemas", "dependentRequired", "unevaluatedProperties", "unevaluatedItems",
                "patternProperties", "propertyNames", "minProperties", "x-guidance")
_CHAR_BYTES = 6  # a JSON string character: up to 4 bytes of UTF-8, or a 6-byte \u00XX escape
_KEY_PATTERN, _KEY_CHARS = "^[A-Za-z0-9_]{1,16}$", 16
_SHAPED_CHARS = 64  # the least maxLength of a string with a pattern or format (a date-time, a uuid)
_NUMBER_STEP = 0.01  # llguidance checks multipleOf in decimal: at most 2 decimals, no trailing zero


class Unbounded(ValueError):
    """The schema uses a construct whose output length this module cannot bound."""


@dataclass(frozen=True)
class Caps:
    chars: int  # string maxLength
    items: int  # array maxItems
    extra: int  # extra properties of an object that declares none
    digits: int  # integer digits (|x| < 10**digits)

    def tighter(self, turn: int) -> "Caps":
        """Halve one of items / chars / extra (in turn); digits shrink only once those are 0."""
        if self.items or self.chars or self.extra:
            for field in ("items", "chars", "extra")[turn % 3:] + ("items", "chars", "extra")[: turn % 3]:
                if getattr(self, field):
                    return replace(self, **{field: getattr(self, field) // 2})
        return replace(self, digits=max(1, self.digits - 1))


def bound_schema(schema: Any, budget: int) -> Any:
    """A narrowed copy of `schema` whose every instance is at most `budget` bytes (see the module
    docstring); the tightest caps if even they do not fit. Raises Unbounded for unsupported schemas."""
    caps = Caps(chars=min(budget, 4096), items=min(budget // 2, 256), extra=min(budget // 8, 8), digits=9)
    for turn in itertools.count():
        out, size = _bound(schema, caps, 0)
        if size <= budget or caps == caps.tighter(turn):
            return out
        caps = caps.tighter(turn)


def _bound(s: Any, caps: Caps, depth: int) -> tuple[Any, int]:
    """(narrowed schema, the longest instance in bytes)."""
    if depth > 64:
        raise Unbounded("schema nests deeper than 64 levels")
    if s is True or s == {}:
        return _any_scalar(caps)
    if s is False:
        return False, 0
    if not isinstance(s, dict):
        raise Unbounded(f"a schema must be an object or a boolean, got {type(s).__name__}")
    if any(k in s for k in _UNSUPPORTED):
        raise Unbounded("schema uses " + ", ".join(k for k in _UNSUPPORTED if k in s))
    if "const" in s:
        return s, _literal_bytes(s["const"])
    if "enum" in s:
        return s, max((_literal_bytes(v) for v in s["enum"]), default=0)
    for key in ("anyOf", "oneOf"):
        if key in s:
            rest = {k: v for k, v in s.items() if k != key}
            if rest.keys() - {"description", "title", "default", "examples", "$comment"}:
                raise Unbounded(f"{key} beside other keywords")
            parts = [_bound(b, caps, depth + 1) for b in s[key]]
            return {**s, key: [p for p, _ in parts]}, max((n for _, n in parts), default=0)
    kinds = s.get("type", _implied_type(s))
    if isinstance(kinds, list):
        parts = [_bound_type(s, k, caps, depth) for k in kinds]
        merged: dict = {}
        for p, _ in parts:
            merged.update(p)
        return merged, max((n for _, n in parts), default=0)
    return _bound_type(s, kinds, caps, depth)


def _implied_type(s: dict) -> Any:
    if "properties" in s or "additionalProperties" in s or "required" in s:
        return "object"
    if "items" in s:
        return "array"
    return ["string", "integer", "boolean", "null"]  # no type: any scalar (a subset of anything)


def _bound_type(s: dict, kind: Any, caps: Caps, depth: int) -> tuple[dict, int]:
    out = dict(s)
    if kind == "string":
        # a pattern or format may need some characters: never fewer than _SHAPED_CHARS for those
        cap = max(caps.chars, _SHAPED_CHARS if "pattern" in s or "format" in s else 0)
        out["maxLength"] = max(int(s.get("minLength", 0)), min(int(s.get("maxLength", cap)), cap))
        return out, 2 + _CHAR_BYTES * out["maxLength"]
    if kind in ("integer", "number"):
        limit = 10 ** caps.digits - 1
        out.setdefault("minimum", -limit)
        out.setdefault("maximum", limit)
        biggest = max(abs(out["minimum"]), abs(out["maximum"]))
        whole = len(str(int(math.floor(abs(biggest))))) + 1  # digits and sign
        if kind == "integer":
            return out, whole
        out.setdefault("multipleOf", _NUMBER_STEP)
        step = repr(float(out["multipleOf"]))
        if "e" in step:
            raise Unbounded(f"multipleOf {out['multipleOf']} has too many decimals")
        return out, whole + 1 + len(step.split(".")[1])  # the point and the decimals
    if kind == "boolean":
        return out, 5
    if kind == "null":
        return out, 4
    if kind == "array":
        lo = int(s.get("minItems", 0))
        out["maxItems"] = n = max(lo, min(int(s.get("maxItems", caps.items)), caps.items))
        item, size = _bound(s.get("items", True), caps, depth + 1)
        out["items"] = item
        return out, 2 + n * size + max(0, n - 1)
    if kind == "object":
        return _bound_object(s, out, caps, depth)
    raise Unbounded(f"unknown type {kind!r}")


def _bound_object(s: dict, out: dict, caps: Caps, depth: int) -> tuple[dict, int]:
    props = s.get("properties") or {}
    if not isinstance(props, dict):
        raise Unbounded("properties must be an object")
    missing = set(s.get("required") or ()) - set(props)
    if missing:
        raise Unbounded(f"required properties without a schema: {sorted(missing)[:3]}")
    sizes = []
    out["properties"] = {}
    for name, sub in props.items():
        out["properties"][name], n = _bound(sub, caps, depth + 1)
        sizes.append(_literal_bytes(name) + 1 + n)
    if props or s.get("additionalProperties", True) is False:
        out["additionalProperties"] = False
    else:  # no declared property: a few short-named scalar extras keep it a useful open object
        value, n = _bound(s.get("additionalProperties", True), caps, depth + 1)
        out["additionalProperties"] = False
        out["patternProperties"] = {_KEY_PATTERN: value}
        out["maxProperties"] = k = min(int(s.get("maxProperties", caps.extra)), caps.extra)
        sizes += [2 + _CHAR_BYTES * _KEY_CHARS + 1 + n] * k
    return out, 2 + sum(sizes) + max(0, len(sizes) - 1)


def _any_scalar(caps: Caps) -> tuple[dict, int]:
    limit = 10 ** caps.digits - 1
    schema = {"type": ["string", "integer", "boolean", "null"], "maxLength": caps.chars, "minimum": -limit,
              "maximum": limit}
    return schema, max(2 + _CHAR_BYTES * caps.chars, caps.digits + 1, 5)


def _literal_bytes(v: Any) -> int:
    """Bytes of a literal as the grammar may write it (escaped or not, compact)."""
    return max(len(json.dumps(v, separators=(",", ":"), ensure_ascii=a).encode()) for a in (True, False))
