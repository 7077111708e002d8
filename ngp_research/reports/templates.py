"""Report templates: notebooks in ``notebooks/reports/`` with a papermill ``parameters`` cell.

Each parameter is declared in the ``parameters`` cell as ``name = default  # type: <type> <help>``;
papermill's own inspection reads them. :func:`parse_parameters` checks values given as text (the
command line, a web form) against those declarations before anything runs: an unknown name, a
value of the wrong type or a missing required parameter (declared with ``None``) is refused with
an error naming the parameter.

Examples
--------
>>> spec = {"max_af": Parameter("max_af", "float", 0.01, "ALT frequency ceiling"),
...         "samples": Parameter("samples", "list", [], "sample IDs")}
>>> parse_parameters(spec, {"max_af": "0.05", "samples": "NOR-0001,SYD-0002"})
{'max_af': 0.05, 'samples': ['NOR-0001', 'SYD-0002']}
>>> parse_parameters(spec, {"max_af": "high"})
Traceback (most recent call last):
...
ngp_research.reports.templates.ReportParameterError: max_af: expected a float, got 'high'
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import RefusedError

__all__ = ["Parameter", "ReportParameterError", "TEMPLATES_DIR", "template_path", "template_names",
           "template_parameters", "parse_parameters", "template_hash"]

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "notebooks" / "reports"
_TYPES = ("str", "int", "float", "bool", "list")
_ARTICLE = {"int": "an"}


class ReportParameterError(RefusedError, ValueError):
    """A report parameter is unknown, of the wrong type, or missing; nothing was run."""


@dataclass(frozen=True)
class Parameter:
    """One template parameter: its name, type, default (None: required) and help text."""

    name: str
    type: str
    default: object
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type, "default": self.default, "help": self.help,
                "required": self.required}


def template_names(root: Path | None = None) -> list[str]:
    """The report templates available, by name (file name without ``.ipynb``)."""
    root = Path(root or TEMPLATES_DIR)
    return sorted(p.stem for p in root.glob("*.ipynb")) if root.is_dir() else []


def template_path(name: str, root: Path | None = None) -> Path:
    """The notebook of template ``name``; an unknown name is refused with the known ones."""
    names = template_names(root)
    if name not in names:
        raise ReportParameterError(f"template: no report template {name!r} (templates: {', '.join(names) or 'none'})")
    return Path(root or TEMPLATES_DIR) / f"{name}.ipynb"


def template_hash(path) -> str:
    """sha256 of the template notebook's bytes: the version of the template a run used."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def template_parameters(path) -> dict[str, Parameter]:
    """The parameters declared in the template's ``parameters`` cell, in order."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    if not found:
        raise ReportParameterError(f"template {Path(path).stem}: no parameters cell")
    out = {}
    for name, p in found.items():
        kind = (p.get("inferred_type_name") or "None").strip()
        default = _literal(p.get("default") or "None")
        if kind not in _TYPES:
            kind = type(default).__name__ if default is not None and type(default).__name__ in _TYPES else "str"
        out[name] = Parameter(name, kind, default, (p.get("help") or "").strip())
    return out


def _convert(parameter: Parameter, value):
    kind, name = parameter.type, parameter.name
    if not isinstance(value, str):  # already typed (JSON from the web form)
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind == "list" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if type(value).__name__ == kind:
            return value
        raise ReportParameterError(f"{name}: expected {_ARTICLE.get(kind, 'a')} {kind}, got {value!r}")
    text = value.strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ReportParameterError(f"{name}: expected {_ARTICLE.get(kind, 'a')} {kind}, got {value!r}") from None
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise ReportParameterError(f"{name}: expected true or false, got {value!r}")
    if kind == "list":
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise ReportParameterError(f"{name}: expected a list like a,b or [\"a\", \"b\"], got {value!r}") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ReportParameterError(f"{name}: expected a list of text values, got {value!r}")
            return items
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def parse_parameters(spec: dict[str, Parameter], given: dict) -> dict:
    """Check and convert ``given`` (name -> text or JSON value) against the template's ``spec``.

    Returns only the parameters given (papermill keeps the template's defaults for the rest).
    """
    unknown = [n for n in given if n not in spec]
    if unknown:
        raise ReportParameterError(f"{unknown[0]}: not a parameter of this template (parameters: "
                                   f"{', '.join(spec)})")
    out = {name: _convert(spec[name], value) for name, value in given.items()}
    missing = [p.name for p in spec.values() if p.required and p.name not in out]
    if missing:
        raise ReportParameterError(f"{missing[0]}: required (this template has no default for it)")
    return out
