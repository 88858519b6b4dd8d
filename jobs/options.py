"""Command-line options and job files, generated from config dataclasses: each option is declared once.

An option is a field of a frozen config dataclass with ``metadata["help"]`` (see `pipeline/config.py`,
`model/config.py`'s `InferenceConfig`, `jobs/segment_options.py`'s `RunOptions`). In a tree of dataclasses (a
field whose type is a dataclass is a branch) each such field gives:

- an argparse option (:func:`add_options`): ``--`` + ``metadata["option"]`` or the field name with ``-``
  for ``_``; ``int`` / ``float`` / ``str`` values; ``bool`` is a switch (``--x`` for a False default, a
  negative name such as ``--no-progress`` for a True one); ``tuple[str, ...]`` is repeatable; a
  ``Literal[...]`` gives the choices; ``X | None`` may stay unset; a field without a default is required;
  the help text shows the default;
- a key of the job file (:func:`read_job_file`, ``--config job.yaml``): a YAML mapping from option names
  (``max-actors`` or ``max_actors``) to values of the option's type (a list or one string for a repeatable
  option, ``true`` for a switch), checked like the flags; an unknown key is an error that names it;
- its value in the built dataclasses (:func:`build`): the field's default, overridden by the job file,
  overridden by the flags given on the command line;
- a row of the README's option table (:func:`markdown_table`; ``python -m jobs.segment_options`` prints
  the segment job's table).

Adding an option is adding the field (type, default, ``metadata={"help": ...}``) to the dataclass whose
code reads it; values are then validated in that dataclass's ``__post_init__`` (``Literal`` fields by
`model.config.check_literal_fields`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from model.config import literal_choices

Kind = Literal["bool", "int", "float", "str", "list"]
T = TypeVar("T")

CONFIG_FLAG = "--config"
CONFIG_HELP = (
    "a YAML job file: option names as keys (e.g. `max-actors: 16`, `input: [s3://a/, s3://b/]`); flags given on "
    "the command line override it"
)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # default of an option whose field has none


class JobFileError(ValueError):
    """A job file that cannot be used: unreadable, not a mapping, an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class Option:
    """One option, derived from one dataclass field."""

    name: str  # the flag without "--"; also the job file's key
    path: tuple[str, ...]  # field names from the root dataclass down to the field
    kind: Kind
    default: Any  # the field's default (REQUIRED when it has none)
    help: str
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None is a valid value
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def negated(self) -> bool:
        """A switch whose field defaults to True: giving it sets the field to False (``--no-progress``)."""
        return self.kind == "bool" and self.default is True


def options(root: type, *, prefix: tuple[str, ...] = ()) -> list[Option]:
    """The options of the dataclass ``root`` and of its dataclass-typed fields, in field order."""
    hints = typing.get_type_hints(root)
    found: list[Option] = []
    for f in dataclasses.fields(root):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            found += options(annotation, prefix=(*prefix, f.name))  # type: ignore[arg-type]
            continue
        if "help" not in f.metadata:
            continue  # configuration, but no option
        kind, optional = _kind(annotation, where=f"{root.__name__}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        name = f.metadata.get("option", f.name.replace("_", "-"))
        if kind == "bool" and default is True and not name.startswith("no-"):
            raise TypeError(f"{root.__name__}.{f.name}: a switch that defaults to True needs an option 'no-...'")
        found.append(
            Option(
                name=name,
                path=(*prefix, f.name),
                kind=kind,
                default=default,
                help=str(f.metadata["help"]),
                choices=literal_choices(annotation),
                optional=optional,
                metavar=f.metadata.get("metavar"),
            )
        )
    names = [o.name for o in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TypeError(f"{root.__name__}: options declared twice: {duplicates}")
    return found


def _kind(annotation: Any, *, where: str) -> tuple[Kind, bool]:
    """The option kind of a field annotation and whether None is allowed."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            raise TypeError(f"{where}: no option type for {annotation}")
        annotation = members[0]
    if typing.get_origin(annotation) is Literal:
        return "str", optional
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...):
        return "list", optional
    kinds: dict[Any, Kind] = {bool: "bool", int: "int", float: "float", str: "str"}
    if annotation not in kinds:
        raise TypeError(f"{where}: no option type for {annotation}")
    return kinds[annotation], optional


# --- argparse ---------------------------------------------------------------------------------------------


def _describe_default(option: Option) -> str:
    if option.required:
        return "required"
    if option.kind == "bool":
        return "unset" if option.default is None else "off"
    if option.default is None:
        return "none"
    return str(option.default)


def add_options(parser: argparse.ArgumentParser, found: Sequence[Option]) -> None:
    """Add ``found`` and ``--config`` to ``parser``. Options not given stay out of the namespace (no defaults
    there): :func:`parse_values` merges them with the job file, :func:`build` with the fields' defaults."""
    for option in found:
        text = option.help.replace("%", "%%")
        extra = "repeatable, required" if option.required and option.kind == "list" else _describe_default(option)
        if not option.required and option.kind != "bool":
            extra = f"default: {extra}"
        kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS, "help": f"{text} ({extra})"}
        if option.kind == "bool" and option.optional:  # unset (None) means a default chosen later: --x / --no-x
            kwargs["action"] = argparse.BooleanOptionalAction
        elif option.kind == "bool":
            kwargs["action"] = "store_false" if option.negated else "store_true"
        elif option.kind == "list":
            kwargs.update(action="append", metavar=option.metavar)
        else:
            kwargs.update(type={"int": int, "float": float, "str": str}[option.kind], metavar=option.metavar)
            kwargs["choices"] = option.choices
        parser.add_argument(option.flag, **kwargs)
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE",
        default=None,
        help=CONFIG_HELP,
    )


def parse_values(
    parser: argparse.ArgumentParser, found: Sequence[Option], argv: Sequence[str] | None
) -> dict[str, Any]:
    """``argv`` parsed and merged over the ``--config`` job file: ``{dest: value}`` of the options set by either.

    Errors (a bad flag, a bad job file, a missing required option) exit with argparse's usage line and code 2.
    """
    namespace = vars(parser.parse_args(argv))
    job_file = namespace.pop(CONFIG_FLAG.lstrip("-"), None)
    values: dict[str, Any] = {}
    if job_file is not None:
        try:
            values = read_job_file(job_file, found)
        except JobFileError as exc:
            parser.error(str(exc))
    values.update(namespace)
    missing = [o.flag for o in found if o.required and o.dest not in values]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return values


def flag_message(message: str, found: Sequence[Option]) -> str:
    """A configuration error as the user knows the options: the first option it mentions goes first, Python
    field names become flags (``"batch_size must be positive, got 0"`` -> ``"--batch-size: must be positive,
    got 0"``). A message that mentions no option is returned as it is."""
    first: tuple[int, Option, re.Match[str]] | None = None
    for option in found:
        field = option.path[-1]
        for spelling in dict.fromkeys((option.flag, field, field.replace("_", " "))):
            match = re.search(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", message)
            if match and (first is None or match.start() < first[0]):
                first = (match.start(), option, match)
    if first is None:
        return message
    _, option, match = first
    reason = message[match.end() :].lstrip(" :") if match.start() == 0 else message
    for other in found:
        if "_" in other.path[-1]:
            reason = re.sub(rf"(?<![\w-]){re.escape(other.path[-1])}(?![\w-])", other.flag, reason)
    return f"{option.flag}: {reason}"


# --- job files --------------------------------------------------------------------------------------------


def read_job_file(path: str, found: Sequence[Option]) -> dict[str, Any]:
    """The values of a YAML job file as ``{dest: value}``, checked against the options ``found``."""
    import yaml  # only when a job file is given

    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as exc:
        raise JobFileError(f"{CONFIG_FLAG} {path}: cannot read it: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise JobFileError(f"{CONFIG_FLAG} {path}: not valid YAML: {exc}") from exc
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise JobFileError(f"{CONFIG_FLAG} {path}: expected a mapping of option names to values")
    by_name = {o.name: o for o in found}
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = str(key).replace("_", "-")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise JobFileError(f"{CONFIG_FLAG} {path}: unknown option {key!r}{hint}")
        option = by_name[name]
        values[option.dest] = _file_value(option, value, where=f"{CONFIG_FLAG} {path}: {key}")
    return values


def _file_value(option: Option, value: Any, *, where: str) -> Any:
    """A job file's value for ``option`` as the flag would have stored it (a switch stores the field value)."""
    expected = {
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "list": "a string or a list of strings",
    }[option.kind]
    if value is None and option.optional:
        return None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, str)
        or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)),
    }[option.kind]
    if not ok:
        raise JobFileError(f"{where}: expected {expected}, got {value!r}")
    if option.choices is not None and value not in option.choices:
        raise JobFileError(f"{where}: {value!r} is not one of {', '.join(option.choices)}")
    if option.kind == "bool":
        return not value if option.negated else value
    if option.kind == "float":
        return float(value)
    if option.kind == "list":
        return [value] if isinstance(value, str) else list(value)
    return value


# --- building the dataclasses ------------------------------------------------------------------------------


def build(root: type[T], values: Mapping[str, Any]) -> T:
    """An instance of the dataclass ``root``: its fields' defaults, overridden by ``values`` (``{dest: value}``,
    as :func:`parse_values` returns; entries of other roots are ignored). Raises what ``__post_init__`` raises."""
    given = {o.path: _field_value(o, values[o.dest]) for o in options(root) if o.dest in values}
    return _construct(root, (), given)


def _field_value(option: Option, value: Any) -> Any:
    return tuple(value) if option.kind == "list" else value


def _construct(cls: type[T], prefix: tuple[str, ...], given: Mapping[tuple[str, ...], Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], path, given)
        elif path in given:
            kwargs[f.name] = given[path]
    return cls(**kwargs)


# --- documentation ----------------------------------------------------------------------------------------


def markdown_table(found: Sequence[Option]) -> str:
    """The README's option table: one row per option (``--config`` last), default and help as in ``--help``."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for o in found:
        value = o.metavar or ("{" + ",".join(o.choices) + "}" if o.choices else None)  # as in --help's usage
        flag = f"`{o.flag} {value}`" if value else f"`{o.flag}`"
        if o.kind == "list":
            flag += " (repeatable)"
        default = _describe_default(o)
        if not o.required and o.kind != "bool" and o.default is not None:
            default = f"`{default}`"
        meaning = o.help.replace("|", "\\|")  # a literal pipe would end the cell
        lines.append(f"| {flag} | {default} | {meaning} |")
    lines.append(f"| `{CONFIG_FLAG} FILE` | none | {CONFIG_HELP} |")
    return "\n".join(lines) + "\n"
