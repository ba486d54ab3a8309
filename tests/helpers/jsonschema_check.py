"""A validator for the JSON Schema subset docs/schema/cemd-monitor-v1.schema.json uses.

No third-party validator is a dependency; this one implements exactly the keywords the schema
uses and fails on any other, so the schema cannot use a keyword that goes unchecked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
JSON_SCHEMA = json.loads((REPO / "docs/schema/cemd-monitor-v1.schema.json").read_text())


class Invalid(AssertionError):
    pass


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}


def check(instance: Any, schema: dict[str, Any], root: dict[str, Any] = JSON_SCHEMA, where: str = "$") -> None:
    """Draft 2020-12 semantics for: type enum const required properties items min/maxItems minimum maximum
    minLength pattern oneOf allOf $ref. Any other keyword fails, so the schema can't use one unchecked."""
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            target: Any = root
            for part in value.removeprefix("#/").split("/"):
                target = target[part]
            check(instance, target, root, where)
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            if not any(_TYPES[t](instance) for t in types):
                raise Invalid(f"{where}: {instance!r} is not of type {value}")
        elif key == "enum":
            if not any(instance == v and type(instance) is type(v) for v in value):
                raise Invalid(f"{where}: {instance!r} not in {value}")
        elif key == "const":
            if instance != value:
                raise Invalid(f"{where}: {instance!r} != {value!r}")
        elif key == "required":
            if isinstance(instance, dict):
                missing = [k for k in value if k not in instance]
                if missing:
                    raise Invalid(f"{where}: missing {missing}")
        elif key == "properties":
            if isinstance(instance, dict):
                for name, sub in value.items():
                    if name in instance:
                        check(instance[name], sub, root, f"{where}.{name}")
        elif key == "items":
            if isinstance(instance, list):
                for i, item in enumerate(instance):
                    check(item, value, root, f"{where}[{i}]")
        elif key in ("minItems", "maxItems"):
            if isinstance(instance, list) and (len(instance) < value if key == "minItems" else len(instance) > value):
                raise Invalid(f"{where}: {len(instance)} items breaks {key}={value}")
        elif key == "minimum":
            if _TYPES["number"](instance) and instance < value:
                raise Invalid(f"{where}: {instance} < {value}")
        elif key == "maximum":
            if _TYPES["number"](instance) and instance > value:
                raise Invalid(f"{where}: {instance} > {value}")
        elif key == "minLength":
            if isinstance(instance, str) and len(instance) < value:
                raise Invalid(f"{where}: shorter than {value}")
        elif key == "pattern":
            if isinstance(instance, str) and not re.search(value, instance):
                raise Invalid(f"{where}: {instance!r} does not match {value}")
        elif key == "allOf":
            for sub in value:
                check(instance, sub, root, where)
        elif key == "oneOf":
            passed = 0
            for sub in value:
                try:
                    check(instance, sub, root, where)
                    passed += 1
                except Invalid:
                    pass
            if passed != 1:
                raise Invalid(f"{where}: matches {passed} of the oneOf branches, not exactly 1")
        else:
            raise AssertionError(f"test validator does not implement JSON Schema keyword {key!r}")
