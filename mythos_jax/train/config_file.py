"""YAML and JSON config files; a syntax error is one ``ValueError`` naming file:line:column.

    fields = read_mapping("run.yaml")        # .yaml / .yml / .json, a mapping at the top
    fields = read_json("runs/small/train_config.json")
"""

from __future__ import annotations

import json
from typing import Any


def read_mapping(path: str) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml``/``.json`` file."""
    if path.endswith(".json"):
        fields = read_json(path)
    elif path.endswith((".yaml", ".yml")):
        import yaml
        with open(path) as f:
            try:
                fields = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
                problem = getattr(err, "problem", None) or err
                raise ValueError(f"{where}: invalid YAML: {problem}") from None
    else:
        raise ValueError(f"config file {path!r}: expected a .yaml, .yml or .json file")
    if not isinstance(fields, dict):
        raise ValueError(f"config file {path!r}: expected a mapping at the top level")
    return fields


def read_json(path: str) -> Any:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") \
                from None
