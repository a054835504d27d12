"""Check a config's inputs for any loader node against that node's own schema.

A ``nodes`` entry of preload_config.json names a node id and the widget values it is called
with. They are checked against the node's ``INPUT_TYPES()`` (V1 nodes, and V3 nodes through the
compatibility view ComfyUI gives them) the way ComfyUI checks a prompt, but with every problem at
once, each naming its field, so one log line says all that is wrong with an entry.

Pure: the schema comes in as the plain dict ``INPUT_TYPES()`` returns.
"""

from __future__ import annotations

import math
from typing import Any

COMBO = "COMBO"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", COMBO)
SHOWN_OPTIONS = 12


class NodeInputsError(ValueError):
    """The inputs do not fit the node's schema; ``problems`` has one message per field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _options(spec: tuple) -> list[Any] | None:
    """The choices of a combo input (V1: a list as the type; V3/newer V1: ``("COMBO", {"options"})``)."""
    kind = spec[0]
    if isinstance(kind, list | tuple):
        return list(kind)
    if kind == COMBO:
        return list((spec[1] if len(spec) > 1 else {}).get("options", []))
    return None


def _shown(options: list[Any]) -> str:
    head = ", ".join(map(str, options[:SHOWN_OPTIONS]))
    more = len(options) - SHOWN_OPTIONS
    return (head + (f" … ({more} more)" if more > 0 else "")) or "(none: the list is empty)"


def _check_value(spec: tuple, value: Any) -> str | None:
    """Why ``value`` does not fit the input described by ``spec``, or None."""
    options = _options(spec)
    settings = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options is not None:
        return None if value in options else f"{value!r} is not one of: {_shown(options)}"
    kind = spec[0]
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
    if kind == "STRING":
        return None if isinstance(value, str) else f"must be a string, not {value!r}"
    if kind in ("INT", "FLOAT"):
        numeric = int if kind == "INT" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or (
                isinstance(value, float) and not math.isfinite(value)):
            return f"must be {'an integer' if kind == 'INT' else 'a number'}, not {value!r}"
        if "min" in settings and value < settings["min"]:
            return f"{value!r} is below the minimum {settings['min']}"
        if "max" in settings and value > settings["max"]:
            return f"{value!r} is above the maximum {settings['max']}"
        return None
    return (f"is a {kind} input (a link from another node), which a config cannot give; only widget values "
            f"({', '.join(WIDGET_TYPES)}) can be set")


def check_node_inputs(node_id: str, input_types: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs to call ``node_id`` with: ``inputs`` checked, plus the defaults of required widget
    inputs left out (as the page fills them in). Raises NodeInputsError naming every bad field."""
    required = dict(input_types.get("required") or {})
    optional = dict(input_types.get("optional") or {})
    problems: list[str] = []
    known = {**required, **optional}
    for name in inputs:
        if name not in known:
            problems.append(f"field 'inputs.{name}': {node_id} has no input {name!r} (its inputs: "
                            f"{', '.join(known) or 'none'})")
    resolved: dict[str, Any] = {}
    for name, spec in known.items():
        spec = tuple(spec) if isinstance(spec, list | tuple) else (spec,)
        if name in inputs:
            problem = _check_value(spec, inputs[name])
            if problem:
                problems.append(f"field 'inputs.{name}': {problem}")
            else:
                resolved[name] = inputs[name]
        elif name in required:
            settings = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in settings and _check_value(spec, settings["default"]) is None:
                resolved[name] = settings["default"]
            else:
                problems.append(f"field 'inputs.{name}': required by {node_id} and has no default; give it")
    if problems:
        raise NodeInputsError(problems)
    return resolved
