"""The command line of srdrl-train, srdrl-eval and srdrl-make-data, from dataclasses.

Every field of the config dataclasses is a flag (``transformers.HfArgumentParser`` does the
dataclass -> argparse part), spelled ``--field_name`` or ``--field-name``; its help is the
docstring written under the field. ``--config PATH`` reads values from a YAML or JSON file
first, one flat mapping of field names to values; flags given on the command line override
them:

    srdrl-train --config runs/mud.yaml --learning_rate 1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

from srdrl.config import field_docs

CONFIG_FLAG = "--config"


def _field_types(classes) -> dict[str, object]:
    """Field name -> its type hint, over all classes; duplicate names are a bug."""
    hints: dict[str, object] = {}
    for cls in classes:
        for name, hint in typing.get_type_hints(cls).items():
            if name in hints or name == CONFIG_FLAG[2:]:
                raise TypeError(f"field {name!r} of {cls.__name__} clashes with another flag")
            hints[name] = hint
    return hints


def _coerce(value, hint, where: str):
    """``value`` from a config file as the field's type (str, int, float, bool, optional)."""
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union,
                                                                   types.UnionType))
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: null is not allowed (expected {base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif base in (int, float):
        if isinstance(value, str):
            try:
                return base(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
                base is float or float(value).is_integer()):
            return base(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # a type this module does not know: let the dataclass judge it
        return value
    raise ValueError(f"{where}: expected {base.__name__}, got {value!r}")


def read_config_file(path: str | Path, classes) -> dict:
    """The mapping in a .yaml/.yml/.json file, each value checked against its field's type.

    Raises ValueError naming the file and the key for an unknown key or a wrong value, and
    FileNotFoundError when the file is missing."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{path}: a config file is .yaml, .yml or .json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
    else:
        import yaml  # a dependency of transformers

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = "" if mark is None else f", line {mark.line + 1}"
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ValueError(f"{path}{line}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values, got "
                         f"{type(data).__name__}")
    hints = _field_types(classes)
    values = {}
    for key, value in data.items():
        if key not in hints:
            near = str(key).replace("-", "_")
            hint = f" (did you mean {near!r}?)" if near in hints else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}")
        values[key] = _coerce(value, hints[key], f"{path}: {key}")
    return values


def build_parser(classes: tuple[type, ...], *, prog: str, description: str):
    """The HfArgumentParser of ``classes`` plus ``--config``, help from the field docs."""
    from transformers import HfArgumentParser  # late: the package is slow to import
    from transformers.hf_argparser import string_to_bool

    # HfArgumentParser gives each --field_name the --field-name spelling too (5.17 and 5.24
    # do); prefixes are off, else the two spellings make every abbreviation ambiguous
    parser = HfArgumentParser(classes, prog=prog, description=description, allow_abbrev=False)
    parser.add_argument(CONFIG_FLAG, metavar="PATH", default=argparse.SUPPRESS,
                        help="YAML (.yaml/.yml) or JSON file: a flat mapping of field names "
                             "to values; flags on the command line override it")
    docs = {k: v for cls in classes for k, v in field_docs(cls).items()}
    for action in parser._actions:
        if action.dest not in docs:
            continue
        action.help = docs[action.dest].replace("%", "%%")  # argparse %-formats help
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_x
            action.help = f"Set {action.dest} to False. {action.help}"
        if action.type is string_to_bool and action.nargs is None:
            # a `bool | None` field (unset means "decide from the other flags"): a bare flag
            # means true, as it does for a plain bool
            action.nargs, action.const = "?", True
        if action.required or isinstance(action, argparse._StoreFalseAction):
            action.default = argparse.SUPPRESS  # no misleading "(default: ...)" in the help
    return parser


def parse_config(classes: tuple[type, ...], argv: list[str] | None, *, prog: str,
                 description: str) -> tuple:
    """Instances of the dataclasses `classes` from a config file and the command line.

    `--config PATH` (.yaml/.yml or .json; a mapping of field names to values, all classes'
    fields in one flat mapping) gives values; flags on the command line override them.
    Unknown keys in the file are an error naming the file and the key. Help for every flag
    comes from the docstring written under each dataclass field (srdrl.config.field_docs).
    A __post_init__ ValueError becomes a usage error (argparse exit 2) with its message."""
    parser = build_parser(classes, prog=prog, description=description)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument(CONFIG_FLAG, default=None)
    try:
        config_path = pre.parse_known_args(argv)[0].config
    except argparse.ArgumentError as e:  # "--config" without a path
        parser.error(str(e))
    if config_path is not None:
        try:
            values = read_config_file(config_path, classes)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the file fulfils a required flag
            if action.dest in values:
                action.required = False
    namespace = parser.parse_args(argv)
    try:
        return tuple(cls(**{f.name: getattr(namespace, f.name)
                            for f in dataclasses.fields(cls) if f.init}) for cls in classes)
    except ValueError as e:  # a __post_init__ check
        parser.error(str(e))
