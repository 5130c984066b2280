"""The one settings mechanism of every entry point: train.py, finetune.py and
`python -m gptjax.cli.sample | evaluate | bench`.

Settings are the fields of frozen dataclasses (GPTConfig, OptimConfig, LoopConfig, ...),
grouped in named sections. Each field is an option (`n_layer` -> `--n-layer 6`); the
`# comment` above the field is its help; enumerated fields list their choices; a
boolean takes `--flag` (true), `--flag true|false` or `--no-flag`; an optional field
takes `none`. A config file (`--config`: JSON, TOML or YAML, data only, optionally in
[sections]) sets the same fields by name.

Precedence, lowest first:

  1. the dataclass defaults;
  2. the entry point's base layer, chosen from the layers above it: train.py's preset
     and its training recipe, finetune.py's recipe, the run folder's default name;
  3. with --resume, the settings saved in the run folder (its config.json);
  4. the config file;
  5. the command line.

`--help` is printed after these are resolved, so that each option shows the value the
command would use (`train.py --preset char --help` shows the char preset's n_layer 4).
Unknown keys and wrong types are errors naming the file (or layer) and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptjax.config import coerce_setting, setting_type
from gptjax.train.checkpoint import RUN_CONFIG, CheckpointError
from gptjax.train.optim import SCHEDULES

# The errors of bad input: a one-line message and exit status 2, no traceback.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, CheckpointError)

# The choices of the training loop's enumerated settings (OptimConfig, LoopConfig), shown
# and checked on the command line; the dataclasses check them again.
TRAINING_CHOICES = {"schedule": SCHEDULES, "parallel": ("auto", "pmap", "jit", "mesh")}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_NONE = {"none", "null"}


@dataclass(frozen=True)
class Options:
    """Options of the command line only (never read from a file)."""

    # A JSON, TOML or YAML file of settings: any option of the sections below, by name
    # (tables such as [model] or [optim] are allowed and flattened).
    config: str = ""


@dataclass(frozen=True)
class RunOptions(Options):
    """What train.py and finetune.py do with the run folder."""

    # Continue the run in --out-dir: its saved settings become the defaults and training
    # goes on from its newest readable checkpoint.
    resume: bool = False
    # Delete an existing run folder first.
    overwrite: bool = False
    # No progress bar.
    quiet: bool = False


@dataclass(frozen=True)
class Resolved:
    """The settings of one command: a dataclass instance per section."""

    sections: dict[str, Any]
    # Fields set above the base layer (saved run, config file, command line).
    explicit: frozenset = frozenset()
    # Per field, what --help shows instead of its value (a value decided at run time).
    notes: dict[str, str] = field(default_factory=dict)


class MissingSettings(ValueError):
    """A required setting (a field without a default) was given nowhere."""


# ----------------------------------------------------------------------------- values


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_comments(cls) -> dict[str, str]:
    """The `# comment` lines above each field in the class source (and its bases'), as
    help text."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        buffer: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                buffer.append(stripped.lstrip("#").strip())
                continue
            name = stripped.split(":", 1)[0]
            if buffer and name.isidentifier() and ":" in stripped:
                comments[name] = " ".join(buffer)
            buffer = []
    return comments


def shown(value) -> str | None:
    """A value as --help writes it; None for "no value" (None, or an empty string), whose
    meaning the field's comment gives."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value.isprintable() or value != value.strip()):
        return repr(value)
    return str(value)


def _converter(name: str, kind: type, optional: bool, choices: Sequence | None):
    def convert(text: str):
        if optional and text.lower() in _NONE:
            return None
        value = parse_bool(text) if kind is bool else kind(text)
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(map(str, choices))})")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


class _Bool(argparse.Action):
    """--flag (true) or --flag VALUE."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if values is None else values)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, *,
                       values: Mapping[str, Any] | None = None,
                       choices: Mapping[str, Sequence] | None = None,
                       metavars: Mapping[str, str] | None = None,
                       notes: Mapping[str, str] | None = None):
    """One option per field of `cls`, in a group `title`. The parsed default is None, so
    that `given` can tell what was set. Help: the field's comment, its choices and
    "(default: X)" with X from `values` (the resolved settings) or `notes`. Returns the
    group."""
    doc = (cls.__doc__ or "").strip()
    # (a dataclass without a docstring gets its signature as one: not a description)
    group = parser.add_argument_group(
        title, doc.splitlines()[0] if doc and not doc.startswith(cls.__name__ + "(") else None)
    comments = field_comments(cls)
    choices, metavars, notes = choices or {}, metavars or {}, notes or {}
    for f in dataclasses.fields(cls):
        kind, optional = setting_type(f.type)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting must be an int, float, str "
                            f"or bool (optionally | None), not {f.type}")
        option = "--" + f.name.replace("_", "-")
        allowed = choices.get(f.name)
        help_text = comments.get(f.name, "")
        metavar = metavars.get(f.name)
        if allowed and metavar:  # a long list: named in the help rather than the metavar
            help_text = f"{help_text} One of: {', '.join(map(str, allowed))}.".strip()
        elif allowed:
            metavar = "{" + ",".join(map(str, allowed)) + "}"
        metavar = metavar or kind.__name__.upper()
        value = notes.get(f.name) or (shown(values[f.name]) if values and f.name in values
                                      else None)
        if value is not None:
            help_text = f"{help_text} (default: {value})".strip()
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = f"{help_text} (required)".strip()
        convert = _converter(f.name, kind, optional, allowed)
        kwargs = dict(dest=f.name, type=convert, default=None,
                      help=help_text.replace("%", "%%"))
        if kind is bool:
            group.add_argument(option, action=_Bool, metavar="BOOL", **kwargs)
            group.add_argument("--no-" + option[2:], dest=f.name, action="store_const",
                               const=False, default=None, help=argparse.SUPPRESS)
        else:
            group.add_argument(option, metavar=metavar, **kwargs)
    return group


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# ----------------------------------------------------------------------------- layers


def read_config_file(path: str | Path, *, skip: Sequence[str] = ()) -> dict:
    """A flat mapping from a JSON, TOML or YAML file (data only). Tables ([model], ...)
    are flattened; those named in `skip` are left out."""
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
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in skip:
                flat.update(value)
        else:
            flat[key] = value
    return flat


def split_settings(settings: dict, classes: Mapping[str, type], where: str) -> dict[str, dict]:
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
    """cls(**values) with types checked (ints may stand for floats); a missing required
    field is an error naming its option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MissingSettings("missing required setting(s): "
                              + ", ".join("--" + m.replace("_", "-") for m in missing))
    checked = {k: coerce_setting(k, v, fields[k].type, where) for k, v in values.items()}
    return cls(**checked)


def value_of(upper: dict, cls, name: str):
    """Field `name` of `cls` as the layers above the base give it (type-checked), else the
    field's default: what a base layer is chosen by."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if name not in upper:
        return f.default
    return coerce_setting(name, upper[name], f.type, "settings")


def resolve(sections: Mapping[str, type], *, command_line: dict, config: str = "",
            resume: bool = False, saved_skip: Sequence[str] = (),
            base: Callable[[dict], list[tuple[str, dict]]] | None = None) -> Resolved:
    """Merge the layers (see the module docstring) into one instance per section.

    command_line: the settings given on the command line (see `given`). config: a config
    file, or "". resume: read the saved settings of the run folder `out_dir` (from the
    command line or the file), leaving out its tables named in `saved_skip`. base(upper)
    -> [(where, settings)]: the entry point's base layers, chosen from `upper`, the
    settings of the layers above them merged.
    """
    file_settings = read_config_file(config) if config else {}
    upper: list[tuple[str, dict]] = []
    if resume:
        out_dir = command_line.get("out_dir") or file_settings.get("out_dir")
        if not out_dir:
            raise ValueError("--resume needs --out-dir (the run folder to continue)")
        saved = Path(out_dir) / RUN_CONFIG
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} does not exist")
        upper.append((str(saved), read_config_file(saved, skip=saved_skip)))
    if config:
        upper.append((str(config), file_settings))
    upper.append(("command line", command_line))
    merged_upper: dict = {}
    for where, settings in upper:
        split_settings(settings, sections, where)  # unknown keys: an error naming the layer
        merged_upper.update(settings)
    layers = (base(dict(merged_upper)) if base else []) + upper
    merged: dict[str, dict] = {name: {} for name in sections}
    for where, settings in layers:
        for section, values in split_settings(settings, sections, where).items():
            merged[section].update(values)
    built = {name: build(cls, merged[name], f"settings ({name})")
             for name, cls in sections.items()}
    return Resolved(built, frozenset(merged_upper))


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """An entry point's command line, generated from its settings dataclasses."""

    prog: str
    description: str
    # Settings: the command line, config files and saved runs set them.
    sections: Mapping[str, type]
    # Options of the command line only.
    options: type = Options
    # Enumerated fields: their choices (checked on the command line, listed in --help).
    choices: Mapping[str, Sequence] = field(default_factory=dict)
    # Fields with an open set of values: the metavar --help shows (e.g. "{bpe,char,PATH}").
    metavars: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        seen: dict[str, str] = {}
        for name, cls in [("options", self.options), *self.sections.items()]:
            for f in dataclasses.fields(cls):
                if f.name in seen:
                    raise TypeError(f"{self.prog}: setting {f.name!r} is in both "
                                    f"{seen[f.name]} and {name}")
                seen[f.name] = name

    def parser(self, resolved: Resolved | None = None, *, add_help: bool = True,
               problem: str = "") -> argparse.ArgumentParser:
        """The argparse parser; with `resolved`, each option's help shows its value."""
        epilog = ("Each default shown is the value this command would use (preset, recipe, "
                  "config file, saved run and the options given all applied). Booleans: "
                  "--flag, --flag true|false, --no-flag; optional settings accept none.")
        if problem:
            epilog = (f"The defaults shown are the dataclasses' own: this command's settings "
                      f"could not be resolved ({problem}).")
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description,
                                         epilog=epilog, add_help=False)
        sections = dict(resolved.sections) if resolved else {}
        notes = resolved.notes if resolved else {}
        option_defaults = {f.name: f.default for f in dataclasses.fields(self.options)}
        group = add_dataclass_args(parser, self.options, "options", values=option_defaults,
                                   choices=self.choices, metavars=self.metavars)
        if add_help:  # in that group, not in argparse's own (also titled "options")
            group.add_argument("-h", "--help", action="help", help="show this help and exit")
        for name, cls in self.sections.items():
            instance = sections.get(name)
            if instance is not None:
                values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)}
            else:
                values = {f.name: f.default for f in dataclasses.fields(cls)
                          if f.default is not dataclasses.MISSING}
            add_dataclass_args(parser, cls, f"{name} settings", values=values,
                               choices=self.choices, metavars=self.metavars, notes=notes)
        return parser

    def parse(self, argv: Sequence[str] | None,
              resolve: Callable[[Any, dict], Resolved]) -> tuple[Any, Resolved]:
        """(options, resolved settings) of a command line.

        resolve(options, command_line) merges the layers (usually with `resolve` above).
        With -h / --help, the help built from the resolved settings is printed and
        SystemExit(0) raised; if they cannot be resolved, the dataclass defaults are shown
        and the problem named.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        wants_help = any(a in ("-h", "--help") for a in argv)
        args = self.parser(add_help=False).parse_args(
            [a for a in argv if a not in ("-h", "--help")])
        options = build(self.options, given(args, self.options), "command line")
        command_line = {k: v for cls in self.sections.values()
                        for k, v in given(args, cls).items()}
        try:
            resolved = resolve(options, command_line)
        except BAD_INPUT as err:
            if not wants_help:
                raise
            problem = "" if isinstance(err, MissingSettings) else str(err)
            self.parser(problem=problem).print_help()
            raise SystemExit(0) from None
        if wants_help:
            self.parser(resolved).print_help()
            raise SystemExit(0)
        return options, resolved


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
    except BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
