"""Every command the README shows names a command and options that exist: `klconvert VERB --flag` against the CLI,
`python bench/X.py --flag` and `python tools/X.py --flag` against the script's own options (a renamed flag left the
README telling users to type one that is refused)."""
from __future__ import annotations

import re
from pathlib import Path

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
        assert verb in cli.commands, f"README shows `klconvert {verb}`, which is no command: {line}"
        unknown = [flag for flag in FLAG.findall(rest) if flag not in options_of(cli.commands[verb])]
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
