"""A recipe's regular expression that Python's re cannot compile, or that backtracks without end, is one KLError."""
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


@pytest.mark.parametrize("pattern", ["re:a{4294967296}", "re:" + "(" * 2000 + "a" + ")" * 2000, "re:(unclosed"])
def test_an_uncompilable_pattern_is_one_error(pattern):
    """a{4294967296} raised OverflowError and 2,000 nested groups RecursionError: tracebacks from `plan`."""
    with pytest.raises(KLError, match="is not a valid regular expression"):
        Entry(pattern, "recipe.yaml: targets")


def test_a_pattern_that_backtracks_without_end_stops_at_its_budget(monkeypatch):
    """The budget covers all the names an entry is tried on, not each: many slow matches end too."""
    monkeypatch.setattr(policy_module, "REGEX_BUDGET_S", 0.2)
    entry = Entry(BACKTRACKING, "recipe.yaml:7")
    start = time.perf_counter()
    with pytest.raises(KLError, match=r"recipe\.yaml:7: .* spent over 0\.2 s matching tensor names \(the last "
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
