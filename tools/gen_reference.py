"""The reference parts of the documentation, generated from the code so that they cannot drift from it.

* `docs/configuration.md`: the ALP fields of `ALPConfig`, grouped as its docstring groups them (``Parameters: Group``
  sections), with the type and description from the docstring and the default from the field itself;
* `docs/cli.md`: the flag table of every command, read from the parser the command parses with
  (`trl_alp.cli.main.command_parser`).

A generated block sits between ``<!-- generated: NAME ... -->`` and ``<!-- end generated: NAME -->`` in its page; the
prose around it is written by hand. Regenerate with ``make reference`` (``python tools/gen_reference.py``);
``python tools/gen_reference.py --check`` exits 1 when a committed page differs from what the code generates, as
`tests/test_docs_reference.py` does.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "configuration.md"
CLI_PAGE = DOCS / "cli.md"
REGENERATE = "make reference"

if str(ROOT) not in sys.path:  # run as a script from a clone
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ markdown helpers
def cell(text: str) -> str:
    """`text` as one table cell: on one line, with its pipes escaped outside code spans."""
    text = " ".join(text.split())
    parts = re.split(r"(`+[^`]*`+)", text)  # code spans keep their pipes (the tables extension skips them)
    return "".join(part if part.startswith("`") else part.replace("|", r"\|") for part in parts)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def code(text: str) -> str:
    return f"``{text}``" if "`" in text else f"`{text}`"


def type_name(tp) -> str:
    """A type annotation as written in Python: ``float | None``, ``list[str]``."""
    if tp is type(None) or tp is None:
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def python_value(value) -> str:
    """A default as Python writes it (strings in double quotes)."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


# ------------------------------------------------------------------------------------------------ configuration
@dataclasses.dataclass
class DocField:
    """One field entry of a ``Parameters: Group`` section of a docstring."""

    name: str
    types: list[str]  # the backticked types before *optional*
    default: str | None  # the text after "defaults to", backticks removed
    description: str


ENTRY = re.compile(r"^(\w+) \((.*)\):$")


def docstring_groups(doc: str) -> tuple[str, dict[str, list[DocField]]]:
    """A Google-style docstring's text before its first section, and its ``Parameters: Group`` sections in order."""
    lines = inspect.cleandoc(doc).splitlines()
    intro: list[str] = []
    groups: dict[str, list[DocField]] = {}
    group = None
    for line in lines:
        header = re.match(r"^Parameters: (.+)$", line)
        if header:
            group = header.group(1).strip()
            groups[group] = []
            continue
        if group is None:
            intro.append(line)
            continue
        entry = ENTRY.match(line[4:]) if line.startswith("    ") and not line.startswith("     ") else None
        if entry:
            spec = entry.group(2)
            head, _, default = spec.partition("defaults to")
            kinds = head.split("*optional*")[0]
            groups[group].append(
                DocField(entry.group(1), re.findall(r"`([^`]+)`", kinds), default.strip().strip("`") or None, "")
            )
        elif line.strip() and groups[group]:
            last = groups[group][-1]
            last.description = f"{last.description} {line.strip()}".strip()
    return "\n".join(intro).strip(), groups


def alp_fields() -> dict[str, dataclasses.Field]:
    """`ALPConfig`'s own fields (those `GRPOConfig` does not have), in declaration order."""
    from trl import GRPOConfig

    from trl_alp.config import ALPConfig

    inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
    return {f.name: f for f in dataclasses.fields(ALPConfig) if f.name not in inherited}


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_problems() -> list[str]:
    """Where `ALPConfig`'s docstring and its fields disagree: a field without an entry, an entry without a field, or
    a documented default that is not the field's."""
    from trl_alp.config import ALPConfig

    _, groups = docstring_groups(ALPConfig.__doc__)
    fields = alp_fields()
    documented = {entry.name: entry for entries in groups.values() for entry in entries}
    problems = [f"ALPConfig.{name} has no entry in the docstring" for name in fields if name not in documented]
    problems += [
        f"the docstring documents {name}, which is not an ALPConfig field" for name in documented if name not in fields
    ]
    for name, entry in documented.items():
        if name not in fields:
            continue
        actual = field_default(fields[name])
        if entry.default is None:
            if actual is not None:
                problems.append(f"{name}: the docstring gives no default, the field's is {actual!r}")
            continue
        try:
            stated = ast.literal_eval(entry.default)
        except (ValueError, SyntaxError):
            stated = entry.default
        if stated != actual:
            problems.append(f"{name}: the docstring says it defaults to {entry.default}, the field to {actual!r}")
    return problems


def config_reference() -> str:
    """The generated part of docs/configuration.md."""
    from trl_alp.config import ALPConfig

    intro, groups = docstring_groups(ALPConfig.__doc__)
    fields = alp_fields()
    hints = typing.get_type_hints(ALPConfig)
    header = ("field", "type", "default", "description")
    out = [intro, "Field groups: " + ", ".join(f"[{g}](#{anchor(g)})" for g in groups) + "."]
    for group, entries in groups.items():
        rows = []
        for entry in entries:
            if entry.name not in fields:
                continue
            default = field_default(fields[entry.name])
            kinds = entry.types or [type_name(hints[entry.name])]
            # None is a value where it is the default or the description names it ("`None` disables it")
            if "None" not in kinds and (default is None or "`None`" in entry.description):
                kinds = [*kinds, "None"]
            rows.append((code(entry.name), code(" | ".join(kinds)), code(python_value(default)), entry.description))
        out += [f"## {group}", table(header, rows)]
    documented = {entry.name for entries in groups.values() for entry in entries}
    missing = [name for name in fields if name not in documented]
    if missing:  # a field not yet in the docstring: shown with its help text (tests/test_docs_reference.py fails)
        rows = [
            (
                code(name),
                code(type_name(hints[name])),
                code(python_value(field_default(fields[name]))),
                fields[name].metadata.get("help", ""),
            )
            for name in missing
        ]
        out += ["## Not yet in the docstring", table(header, rows)]
    return "\n\n".join(out)


def anchor(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading."""
    import unicodedata

    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


# ------------------------------------------------------------------------------------------------ command line
def _dataclass_fields(parser) -> dict[str, tuple[type, object]]:
    """``{dest: (annotation, dataclass)}`` of an `HfArgumentParser`'s dataclasses (none for a plain argparse one)."""
    out: dict[str, tuple[type, object]] = {}
    for dtype in getattr(parser, "dataclass_types", ()):
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            out.setdefault(f.name, (hints[f.name], dtype))
    return out


def _is_bool_action(action: argparse.Action) -> bool:
    return getattr(action.type, "__name__", "") == "string_to_bool"


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.dest + (" ..." if action.nargs in ("+", "*") else "")
    name = action.option_strings[0]
    if _is_bool_action(action):
        return f"{name} [true|false]"
    return name


def _type(action: argparse.Action, annotation) -> str:
    if action.choices:
        return " | ".join(str(c) for c in action.choices if c is not None)
    if annotation is not None:
        return type_name(annotation)
    base = getattr(action.type, "__name__", None) or "str"
    return f"list[{base}]" if action.nargs in ("+", "*") else base


def _default(action: argparse.Action) -> str:
    if not action.option_strings and action.nargs in ("+", None):
        return "required"
    value = action.default
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return code(str(value).lower())
    if isinstance(value, (list, tuple)):
        return code(" ".join(map(str, value))) if value else "none"
    if value == "":
        return '`""`'
    return code(str(value))


def flag_rows(parser, only: type | None = None) -> list[tuple[str, str, str, str]]:
    """``(flag, type, default, description)`` of every action of `parser` (of one of its dataclasses with `only`);
    the ``--no_x`` complement of a boolean flag is left out (``--x false`` says the same)."""
    fields = _dataclass_fields(parser)
    rows, seen = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in seen:
            continue
        annotation, owner = fields.get(action.dest, (None, None))
        if only is not None and owner is not only:
            continue
        seen.add(action.dest)
        rows.append((code(_flag(action)), code(_type(action, annotation)), _default(action), _help(action)))
    return rows


def _help(action: argparse.Action) -> str:
    """The flag's help text; a command it quotes loses its backticks (the docs' tests run every quoted
    ``trl-alp ...`` span as a command)."""
    return re.sub(r"`(trl-alp[^`]*)`", r"\1", action.help or "")


FLAG_HEADER = ("flag", "type", "default", "description")
TRLPARSER_CONFIG = (
    "`--config FILE`: a YAML file of flag values (TRL's `TrlParser`); flags given on the command line win over it."
)


def _command_block(command: str) -> str:
    from trl_alp.cli.main import command_parser

    parser = command_parser(command)
    text = [table(FLAG_HEADER, flag_rows(parser))]
    if command != "plot":
        text.append(TRLPARSER_CONFIG)
    return "\n\n".join(text)


def _train_block() -> str:
    from trl import GRPOConfig, ModelConfig

    from trl_alp.cli.main import command_parser
    from trl_alp.cli.train import TrainScriptArguments

    parser = command_parser("train")
    config = (
        "`FILE`",
        "not set",
        "A YAML config file, or a shipped one by name (`tiny_arithmetic`, ...) or package path "
        "(`trl_alp/configs/tiny_arithmetic.yaml`), from any folder. Flags given on the command line win over it.",
    )
    own = [("`--config`", *config), *flag_rows(parser, TrainScriptArguments)]
    alp = ", ".join(code(f"--{name}") for name in alp_fields())
    trl_fields = [f.name for f in dataclasses.fields(GRPOConfig) if f.init]
    model = flag_rows(parser, ModelConfig)
    details = "\n".join("    " + line for line in table(FLAG_HEADER, model).splitlines())
    return "\n\n".join(
        [
            table(FLAG_HEADER, own),
            f"ALP's fields, each a flag ([Configuration](configuration.md)): {alp}.",
            f"TRL's `GRPOConfig` fields ({len(trl_fields)}, with transformers' `TrainingArguments`), each a flag of "
            "the same name: `--learning_rate`, `--max_steps`, `--num_generations`, `--use_vllm`, ... (TRL's "
            "documentation).",
            f'??? note "TRL\'s `ModelConfig` flags: the model, LoRA and quantisation ({len(model)})"\n\n{details}',
        ]
    )


def cli_blocks() -> dict[str, str]:
    """The generated blocks of docs/cli.md, by name: one per parser of `trl_alp.cli.main.PARSERS`."""
    from trl_alp.cli.main import PARSERS

    return {name: _train_block() if name == "train" else _command_block(name) for name in PARSERS}


# ------------------------------------------------------------------------------------------------ pages
def _marker(name: str) -> tuple[str, str]:
    return (
        f"<!-- generated: {name} ({REGENERATE}: tools/gen_reference.py); edit the code, not this block -->",
        f"<!-- end generated: {name} -->",
    )


def fill(text: str, blocks: dict[str, str]) -> str:
    """`text` with every generated block replaced by its content; a block missing from the page is an error."""
    for name, content in blocks.items():
        begin, end = _marker(name)
        pattern = re.compile(re.escape(begin.split(" (")[0]) + r"[^\n]*\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"no generated block {name!r}: add the line {begin!r} and the line {end!r}")
        text = pattern.sub(lambda _m, b=begin, e=end, c=content: f"{b}\n\n{c}\n\n{e}", text, count=1)
    return text


def pages() -> dict[Path, str]:
    """Every generated page as the code makes it now."""
    return {
        CONFIG_PAGE: fill(CONFIG_PAGE.read_text(), {"configuration": config_reference()}),
        CLI_PAGE: fill(CLI_PAGE.read_text(), cli_blocks()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale, writing nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in pages().items():
        if path.read_text() != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}: run `{REGENERATE}`", file=sys.stderr)
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or [p.name for p in (CONFIG_PAGE, CLI_PAGE)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
