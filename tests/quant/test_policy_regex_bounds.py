"""A recipe's regular expression that Python's re cannot compile, or that backtracks without end, is one KLError."""
import re
import time

import pytest

import klconvert.quant.policy as policy_module
from klconvert.errors import KLError
from klconvert.quant.policy import Entry
from testkit import assert_one_line_error, run_cli

# Seven .* before four backreferences: polynomial backtracking of degree ~7 over a 47-character name (re would
# run for hours; the regex module, seconds per name).
BACKTRACKING = r"re:(.*)(.*)(.*)(.*)(.*)(.*)(.*)\7\6\5\4[Q-Z]"
NAME = "model.layers.10.block_sparse_moe.experts.100.w1"


@pytest.mark.parametrize("pattern", ["re:a{4294967296}", "re:" + "(" * 499 + "a" + ")" * 499, "re:(unclosed"])
def test_an_uncompilable_pattern_is_one_error(pattern):
    """a{4294967296} raised OverflowError and 499 nested groups RecursionError: tracebacks from `plan`."""
    with pytest.raises(KLError, match="is not a valid regular expression"):
        Entry(pattern, "recipe.yaml: targets")


@pytest.mark.parametrize("pattern, said", [
    (r"re:model\.layers\.[[:digit:]]+\.block_sparse_moe\.shared_experts\..*", "Possible nested set"),
    (r"re:.*[a&&b]_proj$", "Possible set intersection"),
])
def test_a_set_re_reads_otherwise_than_the_regex_module_is_refused(pattern, said, recwarn):
    """[[:digit:]] is a POSIX class to the regex module, which matches here, and '[' ':' 'd' ... then ']' to Python's
    re, which compressed-tensors and vLLM match with: the recipe kept the shared experts float and wrote an ignore
    entry vLLM matches to nothing (h200). Refused, and without the FutureWarning re printed on stderr."""
    with pytest.raises(KLError, match=re.escape(f"recipe.yaml:12: {pattern!r} holds what Python's re reads as plain "
                                                f"characters and other engines otherwise ({said} at position")):
        Entry(pattern, "recipe.yaml:12")
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_a_pattern_that_backtracks_without_end_stops_at_its_budget(monkeypatch):
    """The budget covers all the names an entry is tried on, not each: many slow matches end too."""
    monkeypatch.setattr(policy_module, "REGEX_BUDGET_S", 0.2)
    entry = Entry(BACKTRACKING, "recipe.yaml:7")
    start = time.perf_counter()
    with pytest.raises(KLError, match=r"recipe\.yaml:7: .* took the recipe's patterns past 0\.2 s matching tensor "
                                      r"names \(the last "
                                      r"'model\.layers\.10\..*'\): it backtracks without end .*; simplify the pattern"):
        for _ in range(1000):
            entry.matches(NAME, True)
    assert time.perf_counter() - start < 5
    quick = Entry(r"re:.*\.experts\.\d+\.w[13]$")   # a usual pattern matches as re.match does
    assert quick.matches(NAME, True) and not quick.matches(NAME[:-1] + "2", True)


def test_plan_refuses_a_backtracking_recipe_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(f"""quant_stage:
  quant_modifiers:
    QuantizationModifier:
      config_groups:
        group_0:
          targets: ["Linear", '{BACKTRACKING}']
          weights: {{num_bits: 4, group_size: 32}}
""")
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe", str(recipe))
    assert_one_line_error(code, err, f"{recipe}:6: ", "backtracks without end")
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("pattern", [r"re:(?:(?:(?:(?:x{1000}){1000}){1000}){1000})|^lm_head$",
                                     r"re:(?:(?:(?:x{100}){100}){100})", r"re:(?:(?:a{1000,}){1000,})",
                                     # (h169's mutants) bounded repeats inside an unbounded one, counted at least once;
                                     # a branch's alternatives summed, not the largest alone
                                     r"re:(?:(?:x{100}){101})*", r"re:a{5000}|b{5000}|c{5000}"])
def test_repeats_inside_repeats_are_refused_before_they_compile(pattern):
    """The regex module writes bounded repeats out as it compiles: the first took 24 GB before the OOM killer."""
    start = time.perf_counter()
    with pytest.raises(KLError, match=r"recipe\.yaml:3: .* spells out [\d,]+ items with its repeats written out"):
        Entry(pattern, "recipe.yaml:3")
    assert time.perf_counter() - start < 1
    assert Entry(r"re:.*\.experts\.\d{1,3}\.w[13]$").matches(NAME, True)


def slow_recipe(path, copies: int) -> None:
    items = ", ".join([f"&a '{BACKTRACKING}'"] + ["*a"] * (copies - 1))
    path.write_text(f"""quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [{items}]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {{num_bits: 4, group_size: 32}}
""")


def test_a_recipes_patterns_share_one_budget(tmp_path, capsys, monkeypatch):
    """200 aliases of one slow pattern: each with a budget of its own ran for minutes."""
    monkeypatch.setattr(policy_module, "REGEX_BUDGET_S", 0.5)
    recipe = tmp_path / "aliases.yaml"
    slow_recipe(recipe, 200)
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe", str(recipe))
    assert_one_line_error(code, err, f"{recipe}:4: ", "past 0.5 s", "backtracks without end")
    assert time.perf_counter() - start < 30


def test_a_list_of_too_many_entries_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "long.yaml"
    slow_recipe(recipe, 1001)
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe", str(recipe))
    assert_one_line_error(code, err, f"{recipe}:4: ", "ignore brings the recipe to 1,001 target and ignore entries, "
                                                      "past the 1,000")


def alias_bomb(path, groups: int, pattern: str) -> None:
    """One group of 1,000 aliased targets, aliased by `groups` groups: a few KB of YAML, groups x 1,000 entries."""
    targets = ", ".join([f"&p '{pattern}'"] + ["*p"] * 999)
    more = "".join(f"        g{i}: *g\n" for i in range(1, groups))
    path.write_text(f"""quant_stage:
  quant_modifiers:
    QuantizationModifier:
      config_groups:
        g0: &g
          targets: [{targets}]
          weights: {{num_bits: 8, group_size: 128}}
{more}""")


def test_aliased_groups_count_toward_one_bound_for_the_recipe(tmp_path, capsys):
    """200 aliases of a group of 1,000 targets were 200,000 entries, each list under its own bound: 8.7 GB and
    minutes before any error."""
    recipe = tmp_path / "groups.yaml"
    alias_bomb(recipe, 200, "lm_head")
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe", str(recipe))
    assert_one_line_error(code, err, f"{recipe}:", "g1.targets brings the recipe to 2,000 target and ignore entries, "
                                                   "past the 1,000")
    assert time.perf_counter() - start < 30


# Ten-way alternations, 900 of them: 18,900 characters that take re and regex ~0.2 s to compile; 10,000 aliases of
# it compiled for half an hour.
SLOW_TO_COMPILE = "re:" + "(a|b|c|d|e|f|g|h|i|j)" * 900


def test_a_pattern_longer_than_a_tensor_name_pattern_is_refused_before_it_compiles(tmp_path, capsys):
    recipe = tmp_path / "long_pattern.yaml"
    alias_bomb(recipe, 1, SLOW_TO_COMPILE)
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe", str(recipe))
    assert_one_line_error(code, err, f"{recipe}:6: ", "is 18,900 characters long, past the 1,000 a tensor-name "
                                                      "pattern needs; simplify the pattern")
    assert time.perf_counter() - start < 10


def test_one_pattern_written_many_times_is_checked_once(monkeypatch):
    """Aliases repeat one pattern: it is parsed and compiled once, not once per alias."""
    parses = []
    parse = policy_module.re_parser.parse
    monkeypatch.setattr(policy_module.re_parser, "parse", lambda *args: parses.append(args) or parse(*args))
    pattern = r"re:.*\.experts\.\d+\.w[13]_written_many_times$"
    first = Entry(pattern, "recipe.yaml:1")
    once = len(parses)
    aliases = [Entry(pattern, f"recipe.yaml:{i}") for i in range(2, 1000)]
    assert once and len(parses) == once and all(alias.compiled is first.compiled for alias in aliases)


def test_compiling_a_recipes_patterns_spends_its_matching_budget(monkeypatch):
    """Patterns compiled without end (each distinct, under the length bound) stop at the budget they share."""
    monkeypatch.setattr(policy_module, "REGEX_BUDGET_S", 0.05)
    budget = policy_module.RegexBudget()
    with pytest.raises(KLError, match=r"recipe\.yaml:\d+: compiling the recipe's patterns took past 0\.05 s; "
                                      r"write fewer, simpler patterns"):
        for i in range(100_000):
            Entry(f"re:{'(a|b|c|d|e|f|g|h|i|j)' * 40}{i}", f"recipe.yaml:{i}", budget)
