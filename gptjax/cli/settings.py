"""Command-line plumbing shared by train.py and finetune.py.

Every field of the config dataclasses becomes an option (`--n-layer 6`,
`--lr 3e-4`, `--scan-layers false`); a config file (JSON, TOML or YAML, data
only) sets the same fields by name. Precedence: dataclass defaults < preset
and recipe < config file < command line. Unknown keys and wrong types are
errors naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from gptjax.train.checkpoint import CheckpointError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` lines above each field in the class source, as help text."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments, buffer = {}, []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            buffer.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if buffer and name.isidentifier() and ":" in stripped:
            comments[name] = " ".join(buffer)
        buffer = []
    return comments


def _base_type(annotation):
    """(python type, optional) of a field annotation such as 'int | None'."""
    hint = annotation
    if isinstance(hint, str):
        optional = "None" in hint
        name = hint.replace("| None", "").replace("None |", "").strip()
        return {"int": int, "float": float, "str": str, "bool": bool}.get(name, str), optional
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One option per field of `cls`; defaults stay None so that we can tell what was given."""
    group = parser.add_argument_group(title)
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        kind, optional = _base_type(field.type)
        option = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = comments.get(field.name, "")
        help_text = f"{help_text} (default: {default})".strip()
        if kind is bool:
            convert = _parse_bool
        elif optional:
            def convert(text, _kind=kind):
                return None if text.lower() in ("none", "null") else _kind(text)
        else:
            convert = kind
        group.add_argument(option, dest=field.name, type=convert, default=None,
                           metavar=kind.__name__.upper(), help=help_text)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def read_config_file(path: str | Path) -> dict:
    """A flat mapping from a JSON, TOML or YAML file (data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise ValueError(f"{path}: YAML config files need `pip install pyyaml`") from err
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"{path}: config files must be .json, .toml or .yaml")
    except (json.JSONDecodeError, ValueError) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot parse: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table of settings")
    # Sections ([model], [optim], ...) are allowed and flattened.
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def split_settings(settings: dict, classes: dict[str, type], where: str) -> dict[str, dict]:
    """Route flat settings to the dataclass that owns each key; unknown keys are errors."""
    owners = {f.name: name for name, cls in classes.items() for f in dataclasses.fields(cls)}
    out: dict[str, dict] = {name: {} for name in classes}
    unknown = sorted(k for k in settings if k not in owners)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}")
    for key, value in settings.items():
        out[owners[key]][key] = value
    return out


def build(cls, values: dict, where: str):
    """cls(**values) with types checked (ints may stand for floats)."""
    from gptjax.config import _coerce

    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {k: _coerce(k, v, fields[k].type, where) for k, v in values.items()}
    return cls(**checked)


def main_wrapper(run: Callable[[Sequence[str] | None], int], argv=None) -> int:
    """Run a CLI: clean one-line errors for bad input (exit 2), no traceback."""
    from gptjax.train.loop import EXIT_BAD_INPUT, EXIT_DIVERGED, TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return run(argv)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
