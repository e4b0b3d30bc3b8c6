"""The docs show only what exists: commands, flags, config fields, paths, links and configs.

Reads README.md, CONTRIBUTING.md and docs/*.md. Every `sae-sweep` or `run_sweep.py` command in
a bash/sh/shell/console block (or on a `$ ` line) must name a real subcommand and only flags
that subcommand has; every `--set section.field=value` a real config field. Every path under
sweeps/, sae/, benchmarks/, tests/ or cluster/ named in backticks must exist, and every
relative link must point at a file (and heading) that exists. Whole configs shown in yaml
blocks must build. The README stays a newcomer's page: at most 300 lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
PATH_ROOTS = ("sweeps", "sae", "benchmarks", "tests", "cluster")
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1", "(", ")"}
README_MAX_LINES = 300
CONFIGURATION = ROOT / "docs" / "configuration.md"
FIELDS = (
    "<!-- every field: written by `python tests/test_docs.py` from the fields' docstrings -->",
    "<!-- end of every field -->",
)


@dataclasses.dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence


@dataclasses.dataclass
class Doc:
    path: Path
    blocks: list[Block]
    prose: list[tuple[int, str]]  # (1-based line number, line) outside fenced blocks

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))


def parse_markdown(path: Path) -> Doc:
    """Split a Markdown file into fenced blocks (indented fences too) and prose lines."""
    blocks, prose = [], []
    lines = path.read_text().splitlines()
    fence = None  # (marker, indent, lang, start line, body)
    for number, line in enumerate(lines, 1):
        stripped = line.lstrip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence = (m.group(1), len(line) - len(stripped), m.group(2).lower(), number, [])
            else:
                prose.append((number, line))
            continue
        marker, indent, lang, start, body = fence
        if stripped.startswith(marker) and not stripped[len(marker) :].strip():
            blocks.append(Block(lang, "\n".join(body), start))
            fence = None
            continue
        body.append(line[indent:] if line[:indent].strip() == "" else line)
    assert fence is None, f"{path.name}: unclosed code fence opened at line {fence[3]}"
    return Doc(path, blocks, prose)


DOCS = [parse_markdown(p) for p in DOC_FILES if p.exists()]


def doc_ids() -> list[str]:
    return [d.name for d in DOCS]


# ---- commands ----


def command_lines(doc: Doc) -> list[tuple[int, str]]:
    """Shell lines of a doc, continuation lines joined: every line of a shell block, and every
    `$ ` line anywhere (its prompt removed)."""
    raw: list[tuple[int, str]] = []
    for block in doc.blocks:
        for offset, line in enumerate(block.text.splitlines(), 1):
            number = block.line + offset
            if line.lstrip().startswith("$ "):
                raw.append((number, line.lstrip()[2:]))
            elif block.lang in SHELL_LANGS:
                raw.append((number, line))
    raw += [(n, line.lstrip()[2:]) for n, line in doc.prose if line.lstrip().startswith("$ ")]
    joined: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in raw:
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    if pending:
        joined.append((start, pending))
    return joined


def split_shell(line: str) -> list[str]:
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        return list(lexer)
    except ValueError:  # unbalanced quotes in a fragment: fall back to plain words
        return line.split("#", 1)[0].split()


def invocations(tokens: list[str]) -> list[list[str]]:
    """The argument lists following each `sae-sweep` or `run_sweep.py` in a command line, up to
    the next shell operator."""
    found = []
    for i, token in enumerate(tokens):
        if token == "sae-sweep" or Path(token).name == "run_sweep.py":
            args = []
            for t in tokens[i + 1 :]:
                if t in SHELL_OPERATORS or set(t) <= set(";&|()"):
                    break
                args.append(t)
            found.append(args)
    return found


def build_cli() -> tuple[dict[str, argparse.ArgumentParser], set[str]]:
    """The parser's subcommands and the top-level parser's own flags."""
    from sweeps.cli import build_parser

    parser = build_parser()
    try:
        choices = parser._subparsers._group_actions[0].choices
    except (AttributeError, IndexError):
        choices = next(
            a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        )
    return dict(choices), set(parser._option_string_actions)


def config_fields() -> dict[str, set[str]]:
    from sweeps.config import Config

    hints = typing.get_type_hints(Config)
    return {
        f.name: {g.name for g in dataclasses.fields(hints[f.name])}
        for f in dataclasses.fields(Config)
    }


PLACEHOLDER_TARGETS = {"section.field", "SECTION.FIELD"}


def check_set(value: str, fields: dict[str, set[str]]) -> str | None:
    target, sep, _ = value.partition("=")
    if target in PLACEHOLDER_TARGETS or "<" in target:
        return None
    section, dot, name = target.partition(".")
    if not sep or not dot:
        return f"--set {value!r} is not section.field=value"
    if section not in fields:
        return f"--set {value!r}: no config section {section!r} (valid: {', '.join(fields)})"
    if name not in fields[section]:
        return f"--set {value!r}: section {section} has no field {name!r}"
    return None


def check_invocation(args: list[str], commands, top_flags, fields) -> list[str]:
    args = [a.strip("[]") for a in args]
    args = [a for a in args if a]
    # Global flags before the subcommand (--help, --version) are the top parser's.
    while args and args[0].startswith("-"):
        if args[0].split("=")[0] not in top_flags:
            return [f"sae-sweep has no top-level flag {args[0]!r}"]
        args = args[1:]
    if not args:
        return []  # `sae-sweep --help`
    sub, rest = args[0], args[1:]
    if sub.isupper() or "<" in sub:  # `sae-sweep COMMAND --help`: a placeholder
        return []
    if sub not in commands:
        return [f"no subcommand {sub!r} (valid: {', '.join(commands)})"]
    flags = commands[sub]._option_string_actions
    problems = []
    for i, arg in enumerate(rest):
        if not arg.startswith("-") or arg == "-" or re.fullmatch(r"-\d.*", arg):
            continue
        if arg == "--":
            break
        flag, eq, inline = arg.partition("=")
        if flag not in flags:
            problems.append(f"{sub} has no flag {flag!r}")
            continue
        if flag == "--set":
            value = inline if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            problem = check_set(value, fields)
            if problem:
                problems.append(f"{sub}: {problem}")
    return problems


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.fixture(scope="module")
def fields():
    return config_fields()


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_commands_exist(doc: Doc, cli, fields):
    commands, top_flags = cli
    problems = []
    for number, line in command_lines(doc):
        for args in invocations(split_shell(line)):
            for problem in check_invocation(args, commands, top_flags, fields):
                problems.append(f"{doc.name}:{number}: {problem}\n    {line.strip()}")
    assert not problems, "\n".join(problems)


def test_the_docs_show_commands(cli):
    """The checks above see the commands: the README's quickstart runs the demo, and the docs
    together show every subcommand."""
    commands, _ = cli
    shown = set()
    for doc in DOCS:
        for _, line in command_lines(doc):
            for args in invocations(split_shell(line)):
                if args:
                    shown.add(args[0])
    readme = next(d for d in DOCS if d.name == "README.md")
    readme_lines = [line for _, line in command_lines(readme)]
    assert any("pip install torch==2.13.0 -e . && sae-sweep demo" in x for x in readme_lines)
    # The test command is .ci/run, which CI runs: it installs the dev extras and runs the suite,
    assert "bash .ci/run" in [x.strip() for x in readme_lines]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    # into a fresh virtual environment, at the versions of constraints.txt by default
    assert 'rm -rf "$venv"' in ci and '"$base" -m venv "$venv"' in ci
    assert '"$python" -m pip install -q torch==2.13.0 -e ".[dev,interop]" "${pins[@]}"' in ci
    assert "pinned) pins=(-c constraints.txt) ;;" in ci
    assert '"$python" -m pytest -q "$@"' in ci
    assert set(commands) <= shown, f"subcommands no doc shows: {sorted(set(commands) - shown)}"


def test_checker_catches_mistakes(cli, fields):
    commands, top_flags = cli

    def problems(line):
        out = []
        for args in invocations(split_shell(line)):
            out += check_invocation(args, commands, top_flags, fields)
        return out

    assert not problems("sae-sweep sweep --config a.yaml --set tune.num_samples=4  # note")
    assert problems("sae-sweep swep --config a.yaml")
    assert problems("sae-sweep best --config a.yaml --run-id 1")  # export's flag, not best's
    assert problems("python run_sweep.py sweep --set tune.num_sample=4")
    assert problems("python run_sweep.py sweep --set tunes.num_samples=4")
    assert problems("ray job submit -- python run_sweep.py resume --config x --overwrite")


# ---- paths and links ----

INLINE_CODE = re.compile(r"`([^`]+)`")
REPO_PATH = re.compile(r"(?<![\w./$-])((?:" + "|".join(PATH_ROOTS) + r")/[\w./-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_paths_exist(doc: Doc):
    missing = []
    for number, line in doc.prose:
        for span in INLINE_CODE.findall(line):
            if any(s in span for s in ("<", "*", "...")):
                continue
            for path in REPO_PATH.findall(span):
                path = path.rstrip(".")
                if not (ROOT / path).exists():
                    missing.append(f"{doc.name}:{number}: `{path}` does not exist")
    assert not missing, "\n".join(missing)


DOTTED = re.compile(r"^((?:sweeps|sae)(?:\.\w+)+)(?:\(.*\))?$")


def resolve(dotted: str) -> bool | None:
    """Whether `package.module.name` exists. None for `sae.<name>` that is no module of the
    library: `sae.safetensors` is a file, `sae.encode(x)` a method of a variable named sae.
    Under `sweeps.` every name is a module path, so a missing module is a stale name."""
    parts = dotted.split(".")
    if importlib.util.find_spec(".".join(parts[:2])) is None:
        return False if parts[0] == "sweeps" else None
    for i in range(len(parts), 1, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_python_names_exist(doc: Doc):
    """`sweeps.activations.cache.load_layer(...)` and the like name real functions."""
    missing = []
    for number, line in doc.prose:
        for span in INLINE_CODE.findall(line):
            m = DOTTED.match(span.strip())
            if m and resolve(m.group(1)) is False:
                missing.append(f"{doc.name}:{number}: `{m.group(1)}` does not exist")
    assert not missing, "\n".join(missing)


def test_readme_links_every_page():
    readme = (ROOT / "README.md").read_text()
    pages = ["CONTRIBUTING.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
    unlinked = [p for p in pages if f"]({p})" not in readme]
    assert not unlinked, f"README.md's Documentation list lacks {unlinked}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    return {slug(line.lstrip("#")) for _, line in doc.prose if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_links_resolve(doc: Doc):
    by_path = {d.path: d for d in DOCS}
    broken = []
    for number, line in doc.prose:
        for target in LINK.findall(line):
            if "://" in target or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.path.parent / file).resolve() if file else doc.path
            if not path.exists():
                broken.append(f"{doc.name}:{number}: link to missing {file}")
            elif anchor and path in by_path and anchor not in anchors(by_path[path]):
                broken.append(f"{doc.name}:{number}: no heading #{anchor} in {file or doc.name}")
    assert not broken, "\n".join(broken)


# ---- configs ----


def whole_configs(doc: Doc) -> list[tuple[int, dict]]:
    """yaml blocks whose top-level keys are all config sections (placeholders skipped)."""
    from sweeps.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    found = []
    for block in doc.blocks:
        if block.lang not in ("yaml", "yml") or "..." in block.text or "<" in block.text:
            continue
        values = yaml.safe_load(block.text)
        if isinstance(values, dict) and values and set(values) <= sections:
            found.append((block.line, values))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_configs_build(doc: Doc):
    from sweeps.config import ConfigError, from_mapping

    errors = []
    for number, values in whole_configs(doc):
        try:
            from_mapping(values)
        except ConfigError as e:
            errors.append(f"{doc.name}:{number}: {e}")
    assert not errors, "\n".join(errors)


def test_readme_shows_a_config():
    readme = next(d for d in DOCS if d.name == "README.md")
    assert whole_configs(readme), "the README's sweep on your own data shows a whole config"


# ---- size ----


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


@pytest.mark.parametrize(
    "command", ["extract", "demo", "sweep", "resume", "best", "export", "analyze"]
)
def test_help_fits_a_terminal_and_shows_the_commands_own_defaults(command, capsys):
    """`--help` once ran to 190 lines, some 696 characters wide, and `demo --help` showed the
    generic defaults (data.source = 'hf'), not the demo's."""
    from sweeps.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 200 and max(map(len, lines)) <= 100
    assert "  train.lr = None: Peak Adam learning rate." in lines
    source = "'folder'" if command == "demo" else "'hf'"
    assert any(line.startswith(f"  data.source = {source}: ") for line in lines)


def fields_reference() -> str:
    """Every field a config file sets, by section, with its default (as JSON, which YAML reads)
    and its whole help: the reference at the end of docs/configuration.md."""
    import json
    import textwrap

    from sae.config import field_help
    from sweeps.config import SEARCHED, Config

    lines = []
    for section in dataclasses.fields(Config):
        cls, searched = typing.get_type_hints(Config)[section.name], SEARCHED.get(section.name, ())
        # As declared: a Config resolves some (storage_path) against where it is built
        defaults = {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
        }
        lines += ["", f"### `{section.name}`", ""]
        for name, text in field_help(cls).items():
            if name not in searched:
                item = f"- `{section.name}.{name}` = `{json.dumps(defaults[name])}`: {text}"
                lines += textwrap.wrap(item, 100, subsequent_indent="  ", break_on_hyphens=False)
        if searched:
            names = ", ".join(f"`{name}`" for name in searched)
            lines += ["", f"Set per trial by the search (refused here): {names}."]
    return "\n".join(lines[1:])


def test_configuration_md_holds_every_fields_whole_help():
    """`--help` shows a field's first sentence and sends the reader to docs/configuration.md,
    which once listed the fields' names only."""
    text = CONFIGURATION.read_text()
    assert all(marker in text for marker in FIELDS), f"{CONFIGURATION} lost its markers {FIELDS}"
    written = text.split(FIELDS[0])[1].split(FIELDS[1])[0].strip()
    assert written == fields_reference(), "stale: run `python tests/test_docs.py` to rewrite it"


if __name__ == "__main__":  # rewrite the field reference in docs/configuration.md
    head, rest = CONFIGURATION.read_text().split(FIELDS[0])
    CONFIGURATION.write_text(
        f"{head}{FIELDS[0]}\n{fields_reference()}\n{FIELDS[1]}{rest.split(FIELDS[1])[1]}"
    )
