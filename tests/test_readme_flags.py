"""Every command the README shows names a command and options that exist: `klconvert VERB --flag` against the CLI,
`python bench/X.py --flag` and `python tools/X.py --flag` against the script's own options (a renamed flag left the
README telling users to type one that is refused); and the reverse, every option of every command written in that
command's README section (`klconvert --version`, bench's `--check` and `--peer none` were in none)."""
from __future__ import annotations

import re
from pathlib import Path

import click

from klconvert.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")
KLCONVERT = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:python -m )?klconvert ([a-z-]+)(.*)$")
SCRIPT = re.compile(r"^(?:[A-Z_]+=\S+ )*python ((?:bench|tools)/[\w]+\.py)(.*)$")


def shown_commands() -> list[str]:
    """Each command line the README shows: an inline code span, or a line of a fenced block (continuations
    joined), cut at the first |, ;, && or comment."""
    lines = [span for span in re.findall(r"`([^`\n]+)`", README)]
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return [re.split(r" \| | && |; | # ", line.strip().removeprefix("$ "))[0] for line in lines]


def options_of(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help", "-h"}


def shown_matching(pattern: re.Pattern) -> list[tuple[str, str, str]]:
    """(the command's name, what follows it, the whole line) for each shown command line `pattern` matches."""
    return [(*match.groups(), line) for line in shown_commands() if (match := pattern.match(line)) is not None]


def test_every_klconvert_command_shown_exists_with_its_options():
    shown = shown_matching(KLCONVERT)
    for verb, rest, line in shown:
        if verb.startswith("--"):   # the top level's own option: `klconvert --version`
            verb, rest = "", verb + rest
        assert verb == "" or verb in cli.commands, f"README shows `klconvert {verb}`, which is no command: {line}"
        unknown = [flag for flag in FLAG.findall(rest) if flag not in options_of(cli.commands.get(verb, cli))]
        assert not unknown, f"README shows klconvert {verb} with {unknown}, which it does not take: {line}"
    assert len(shown) >= 30, len(shown)   # the README shows every command, most more than once


def test_every_script_command_shown_exists_with_its_options():
    shown = shown_matching(SCRIPT)
    for script, rest, line in shown:
        assert (ROOT / script).is_file(), f"README shows {script}, which does not exist: {line}"
        source = (ROOT / script).read_text(encoding="utf-8")
        unknown = [flag for flag in FLAG.findall(rest) if f'"{flag}"' not in source]
        assert not unknown, f"README shows {script} with {unknown}, which it does not take: {line}"
    assert len(shown) >= 5, len(shown)


def readme_sections() -> dict[str, str]:
    """Each command's README section, by the command's name: from its `### `klconvert NAME`` heading (one heading
    may name two) to the next heading; the top level's ("") from "## CLI reference" to the first command's."""
    parts = re.split(r"^(#{2,3} .*)$", README, flags=re.M)
    sections = {}
    for heading, text in zip(parts[1::2], parts[2::2]):
        if heading == "## CLI reference":
            sections[""] = text
        elif heading.startswith("### "):
            sections.update((name, text) for name in re.findall(r"`klconvert ([a-z-]+)`", heading))
    return sections


def choices_shown(text: str, flag: str) -> set[str]:
    """The values shown after `flag` in `text`: `--bits {4,8,16}`, `[--bits 4|8]`, `--peer transformers`."""
    values = re.findall(rf"(?<![\w-]){re.escape(flag)}[ =](\{{[^}}]*\}}|[\w.:-]+(?:\|[\w.:-]+)*)", text)
    return {word for value in values for word in re.split(r"[{},|]", value) if word}


def test_every_option_is_in_its_commands_readme_section():
    """The reverse of the tests above: each option of each command (the top level's too) is written in that
    command's section, each of a flag pair (`--check|--no-check`), and a choice's every value after its flag."""
    sections, unshown = readme_sections(), []
    for name, command in [("", cli), *cli.commands.items()]:
        where = f"klconvert {name}".strip()
        assert name in sections, f"README has no section for {where}"
        text = " ".join(sections[name].split())
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            unshown += [f"{where} {flag}" for flag in (*param.opts, *param.secondary_opts)
                        if flag not in FLAG.findall(text)]
            if isinstance(param.type, click.Choice):
                shown = set().union(*(choices_shown(text, flag) for flag in param.opts))
                unshown += [f"{where} {param.opts[0]} {choice}" for choice in param.type.choices if choice not in shown]
    assert not unshown, f"README's section of each command does not show {unshown}"
