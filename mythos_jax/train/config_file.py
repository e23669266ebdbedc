"""YAML and JSON config files; a syntax error is one ``ValueError`` naming file:line:column.

    fields = read_mapping("run.yaml")        # .yaml / .yml / .json, a mapping at the top
    fields = read_json("runs/small/train_config.json")
"""

from __future__ import annotations

import json
import re
from typing import Any


def read_mapping(path: str) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml``/``.json`` file."""
    if path.endswith(".json"):
        fields = read_json(path)
    elif path.endswith((".yaml", ".yml")):
        import yaml
        with open(path) as f:
            try:
                fields = load_yaml(f.read()) or {}
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
        return parse_json(f.read(), path)


def parse_json(text: str, path: str) -> Any:
    """``json.loads(text)``; a syntax error names ``path:line:column``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def load_yaml(text: str) -> Any:
    """YAML with only true/false as booleans (YAML 1.2): ``act: off`` stays the string "off"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                 re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return yaml.load(text, Loader=Loader)
