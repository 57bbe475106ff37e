"""Reading the YAML file: values with the line each came from, and every problem
worded as `file:line: key.path: what is wrong`, all of them at once, in the
order of the file.

The schema (schema.py) says what is valid; this module keeps the marks pydantic
never sees and turns its errors into sentences: `expected a number, got "soon"`,
`unknown key (did you mean max_recipients?)`, YAML syntax errors in plain words.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from smtpgate.config.schema import Config

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """One or more problems in a config file; each problem is one line of str()."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([syntax_problem(path.name, exc)]) from None
    source = _Source(path.name)
    if root is None:
        raise ConfigError([f"{path.name}:1: (top level): the file is empty"])
    data = source.read(root, ())
    if not isinstance(data, dict):
        source.problem((), f"expected a mapping, got {_shown(root)}")
    else:
        source.drop_unknown(data, Config, ())
    config = source.validate(data, path.resolve().parent)
    if source.problems or config is None:
        raise ConfigError(source.lines())
    config._path = path.resolve()
    for problem in config.warning_problems():
        source.problem(problem.key, problem.message, source._node(problem.key))
    config._warning_lines = tuple(source.lines())
    return config


class _Source:
    """The file's values with their YAML nodes, and the problems found so far."""

    def __init__(self, filename: str):
        self.filename = filename
        self.values: dict[Loc, yaml.Node] = {}
        self.keys: dict[Loc, yaml.Node] = {}
        self.problems: list[tuple[int, str]] = []

    def read(self, node: yaml.Node, loc: Loc) -> Any:
        """node as plain data (mappings as dicts, sequences as tuples); a key set to
        nothing is left out, so it takes its default."""
        self.values[loc] = node
        if isinstance(node, yaml.MappingNode):
            data: dict[str, Any] = {}
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                if key in seen:
                    self.problem(loc + (key,), "duplicate key", key_node)
                seen.add(key)
                self.keys[loc + (key,)] = key_node
                value = self.read(value_node, loc + (key,))
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            return data
        if isinstance(node, yaml.SequenceNode):
            return tuple(self.read(child, loc + (i,)) for i, child in enumerate(node.value))
        return _scalar(node)

    def validate(self, data: Any, base_dir: Path) -> Config | None:
        """The Config of data, or None after adding its problems. Where text is expected,
        a value YAML reads as a number, true/false or a date is taken as written."""
        for _ in range(2):
            try:
                return Config.model_validate(data, context={"base_dir": base_dir})
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
            as_written = [tuple(e["loc"]) for e in errors if e["type"] == "string_type"
                          and isinstance(self.values.get(tuple(e["loc"])), yaml.ScalarNode)
                          and not isinstance(e["input"], str)]
            if not as_written:
                break
            for loc in as_written:
                data = _replaced(data, loc, self.values[loc].value)
        for error in errors:
            self.add(error)
        return None

    def drop_unknown(self, data: dict, model: type[BaseModel], loc: Loc) -> None:
        """Report and remove the keys model does not have, so the rules across the
        known keys are still checked; the nearest known key is the hint."""
        for key in list(data):
            field = model.model_fields.get(key)
            if field is None:
                near = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]}?)" if near else ""
                self.problem(loc + (key,), f"unknown key{hint}", self.keys.get(loc + (key,)))
                del data[key]
                continue
            inner, many = _section_of(field.annotation)
            if inner is None:
                continue
            if not many:
                items = [((), data[key])]
            elif isinstance(data[key], tuple):
                items = [((i,), item) for i, item in enumerate(data[key])]
            else:
                items = []  # a mapping where a list belongs: the schema reports it
            for sub, item in items:
                if isinstance(item, dict):
                    self.drop_unknown(item, inner, loc + (key,) + sub)

    def add(self, error: dict) -> None:
        """One pydantic error as problem lines."""
        loc = tuple(error["loc"])
        if error["type"] == "rules":
            for problem in error["ctx"]["problems"]:
                at = loc + (problem.key if problem.at is None else problem.at)
                self.problem(loc + problem.key, problem.message, self._node(at))
            return
        if error["type"] == "missing":
            self.problem(loc, "required key is missing", self._node(loc[:-1]))
            return
        self.problem(loc, _message(error, self.values.get(loc)), self._node(loc))

    def _node(self, loc: Loc) -> yaml.Node | None:
        """The node at loc, else the nearest one above it (a key that is not there)."""
        while loc not in self.values and loc:
            loc = loc[:-1]
        return self.values.get(loc)

    def problem(self, loc: Loc, message: str, node: yaml.Node | None = None) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append((line, f"{self.filename}:{line}: {_dotted(loc)}: {message}"))

    def lines(self) -> list[str]:
        """Every problem once, in the order of the file's lines."""
        ordered = sorted(self.problems, key=lambda item: item[0])
        return list(dict.fromkeys(text for _, text in ordered))


def _replaced(data: Any, loc: Loc, value: Any) -> Any:
    """data with the value at loc replaced (sequences are tuples: rebuilt)."""
    if not loc:
        return value
    head, rest = loc[0], loc[1:]
    if isinstance(data, dict):
        return {**data, head: _replaced(data[head], rest, value)}
    return tuple(_replaced(item, rest, value) if i == head else item for i, item in enumerate(data))


def _dotted(loc: Loc) -> str:
    """("listeners", 0, "tls") -> "listeners[0].tls"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(top level)"


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a key holds, whether it holds a list of them), or (None, False)."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else None
        elif origin is tuple:
            annotation, many = typing.get_args(annotation)[0], True
        elif origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        else:
            break
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, many
    return None, False


def _scalar(node: yaml.Node) -> Any:
    """A scalar's value with YAML's resolution of numbers, booleans and null;
    anything else (a date, say) as the text written."""
    value = yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(node.value)


def _shown(node: yaml.Node | None) -> str:
    """What the file holds, for "expected ..., got ...": the text as written."""
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        return "nothing"
    if isinstance(node, yaml.ScalarNode):
        return f'"{node.value}"'
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


_EXPECTED = {
    "string_type": "a string",
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "tuple_type": "a list", "list_type": "a list",
    "model_type": "a mapping", "dict_type": "a mapping", "model_attributes_type": "a mapping",
}


def _message(error: dict, node: yaml.Node | None) -> str:
    """The words for one pydantic error about the value in node."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_shown(node)}"
    if kind == "literal_error":
        choices = " | ".join(part.strip("'") for part in ctx["expected"].replace(" or ", ", ").split(", "))
        return f"expected one of {choices}, got {_shown(node)}"
    if kind == "greater_than_equal":
        limit = "must not be negative" if ctx["ge"] == 0 else f"must be at least {_number(ctx['ge'])}"
        return f"{limit}, got {_number(error['input'])}"
    if kind == "greater_than":
        return f"must be more than {_number(ctx['gt'])}"
    if kind == "value_error":
        return str(ctx["error"])
    return error["msg"]


def _number(value: Any) -> Any:
    """1.0 as 1, as the file would say it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# PyYAML's wording of a syntax problem -> the same in plain words.
_SYNTAX_WORDS: tuple[tuple[str, str], ...] = (
    ("found character '\\t'", "a tab character; YAML indents with spaces only"),
    ("tab character", "a tab character; YAML indents with spaces only"),
    ("mapping values are not allowed here",
     "a \": \" where a value was expected: put the value in quotes if it contains \": \", "
     "or check the indentation of this line"),
    ("could not find expected ':'", "expected \"key: value\" (a key is missing its colon)"),
    ("found unexpected end of stream", "the file ends inside a quoted value: a closing quote is missing"),
    ("expected ',' or ']'", "a [list] is not closed with \"]\", or its items lack commas"),
    ("expected ',' or '}'", "a {mapping} is not closed with \"}\", or its items lack commas"),
    ("did not find expected '-' indicator", "a list item must start with \"- \" at the same indentation "
                                            "as the items above it"),
    ("did not find expected key", "this line is not indented like the keys above it"),
    ("expected <block end>, but found '<scalar>'",
     "unexpected text: quote the whole value, or indent this line like the lines above it"),
    ("expected <block end>", "this line is not indented like the lines above it"),
    ("found undefined alias", "*name refers to an anchor &name that is not defined"),
    ("expected a comment or a line break", "unexpected text after a value: quote the whole value"),
    ("cannot start any token", "a value cannot start with this character: put the value in quotes"),
    ("found unknown escape character", "an unknown \\ escape inside a double-quoted value: use single quotes"),
    ("expected the node content", "a value is missing here"),
)

# PyYAML's "while parsing a flow sequence" -> what the reader calls that part.
_SYNTAX_CONTEXTS = {
    "flow sequence": "the [list]", "flow mapping": "the {mapping}", "quoted scalar": "the quoted value",
    "block mapping": "the mapping", "block collection": "the list", "simple key": "the key",
}


def syntax_problem(filename: str, exc: yaml.YAMLError) -> str:
    """One problem line for a YAML syntax error: file, line, column, plain words."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    words = next((plain for jargon, plain in _SYNTAX_WORDS if jargon in problem), None)
    if words is None:
        words = f"not valid YAML ({problem})"
    if mark is None:
        return f"{filename}:1: {words}"
    context, start = getattr(exc, "context", None) or "", getattr(exc, "context_mark", None)
    part = next((name for jargon, name in _SYNTAX_CONTEXTS.items() if jargon in context), None)
    if part is not None and start is not None and start.line != mark.line:
        words += f" ({part} starts on line {start.line + 1})"
    return f"{filename}:{mark.line + 1}: column {mark.column + 1}: {words}"
