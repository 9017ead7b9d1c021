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


def readme_units(text: str) -> list[str]:
    """A section's table rows, one each, and its other paragraphs (lines joined), where a flag's default is stated."""
    units = []
    for paragraph in re.split(r"\n\s*\n", text):
        rows = [line for line in paragraph.splitlines() if line.startswith("|")]
        units += rows + [" ".join(line for line in paragraph.splitlines() if not line.startswith("|"))]
    return [" ".join(unit.split()) for unit in units if unit.strip()]


def stated_forms(value) -> list[str]:
    """How the README may write a value --help shows: 1.0 as 1.0 or 1, 2**32 - 1 as itself or its digits."""
    if isinstance(value, float):
        return [str(value), f"{value:g}"]
    if isinstance(value, int) and value > 1 and (value + 1) & value == 0:
        return [str(value), f"{value:,}", f"2**{value.bit_length()} - 1"]
    return [str(value)]


def states_default(unit: str, flag: str, value) -> bool:
    """`unit` gives `value` as `flag`'s default: 'default 0', 'default: `x`', '`x` (default)', 'T (the default)', or
    '`--flag x`' in a list of defaults."""
    either = "|".join(re.escape(form) for form in stated_forms(value))
    return bool(re.search(rf"defaults?:? `?({either})`?(?![\w.])|(?<![\w.])`?({either})`? \((the )?default\)", unit)
                or "defaults" in unit and any(f"`{flag} {form}`" in unit for form in stated_forms(value)))


def states_largest(unit: str, value: int) -> bool:
    return any(re.search(rf"(?<![\w.*]){re.escape(form)}(?![\w.])", unit) for form in stated_forms(value))


def test_every_default_and_range_help_shows_is_in_the_readme_row_of_its_flag():
    """What `--help` shows of an option -- its default (click's show_default) and, for a bounded whole number, its
    largest value (the seeds') -- is written in the README row or paragraph naming that flag (run's --top-p 1.0,
    synth's --layout released and its --seed's 2**32 - 1 were only in --help)."""
    sections, unstated = readme_sections(), []
    for name, command in cli.commands.items():
        units = [unit for unit in readme_units(sections[name])]
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            flag, named = param.opts[0], [unit for unit in units if param.opts[0] in FLAG.findall(unit)]
            if param.show_default and param.default is not None and \
                    not any(states_default(unit, flag, param.default) for unit in named):
                unstated.append(f"klconvert {name} {flag}: default {param.default}")
            if isinstance(param.type, click.IntRange) and param.type.max is not None and \
                    not any(states_largest(unit, param.type.max) for unit in named):
                unstated.append(f"klconvert {name} {flag}: at most {param.type.max}")
    assert not unstated, f"README does not state, where it shows the flag: {unstated}"
