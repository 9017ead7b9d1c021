"""A recipe's regular expression that Python's re cannot compile is one KLError, whatever re raises."""
import pytest

from klconvert.errors import KLError
from klconvert.quant.policy import Entry


@pytest.mark.parametrize("pattern", ["re:a{4294967296}", "re:" + "(" * 2000 + "a" + ")" * 2000, "re:(unclosed"])
def test_an_uncompilable_pattern_is_one_error(pattern):
    """a{4294967296} raised OverflowError and 2,000 nested groups RecursionError: tracebacks from `plan`."""
    with pytest.raises(KLError, match="is not a valid regular expression"):
        Entry(pattern, "recipe.yaml: targets")
