"""Which linear weights a bitsandbytes quantization_config declares 4-bit, read from untrusted JSON: every linear layer
transformers' replace_with_bnb_linear makes a Linear4bit, all but those llm_int8_skip_modules names (as its
should_convert_module matches them: a regular expression from the name's start to a module boundary, or a suffix of the
name, each against the name transformers gives the module in memory). The routed experts are none: KimiLinearExperts
holds them as 3-D parameters, no nn.Linear, so transformers never converts them whatever the list says. The entries are
regular expressions from the download: run as a recipe's are (quant/policy's Entry), within one budget of CPU time for
them all."""
from __future__ import annotations

from dataclasses import dataclass

from klconvert.errors import KLError, shown
from klconvert.quant.declared import SOURCE
from klconvert.quant.nf4 import SKIP_MODULES
from klconvert.quant.policy import MAX_POLICY_ENTRIES, Entry, RegexBudget

# What transformers skips where the config gives no list, null or absent (get_keys_to_not_convert): the output
# embedding, which is also Kimi Linear's last parameter (its embedding untied)
DEFAULT_SKIPS = ("lm_head",)
# should_convert_module's end of a match: before a '.' or the name's end, or just after a '.'
MODULE_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


@dataclass(frozen=True)
class Skip:
    """One llm_int8_skip_modules entry, as config.json says it and as the regex transformers matches it with."""

    said: str
    regex: Entry

    def matches(self, module: str) -> bool:
        return module.endswith(self.said) or self.regex.matches(module, True)


@dataclass(frozen=True)
class BnbDeclared:
    """A bitsandbytes quantization_config as klconvert reads it: the modules it keeps out of 4-bit, and whether those
    are transformers' DEFAULT_SKIPS, the config giving no list (null or absent)."""

    skips: tuple[Skip, ...]
    defaulted: bool

    def unlisted(self) -> str:
        """How an error says that the skip list does not list the module it names."""
        return (f"{SOURCE} gives no {SKIP_MODULES}, so transformers keeps only {', '.join(DEFAULT_SKIPS)} out of "
                "4-bit" if self.defaulted else f"{SOURCE}.{SKIP_MODULES} does not list it")

    def skipped_by(self, module: str) -> Skip | None:
        """The entry that keeps `module` (a linear layer's in-memory name, converted_module's) out of 4-bit, or None
        where it is declared 4-bit."""
        return next((skip for skip in self.skips if skip.matches(module)), None)


def bnb_declared(quantization_config: dict, where: str) -> BnbDeclared:
    """The skip list (DEFAULT_SKIPS where it is null or absent); KLError where it is no list of strings (transformers'
    BitsAndBytesConfig refuses it), holds more entries than a quantizer writes, or an entry is no pattern Python's re
    compiles."""
    items = quantization_config.get(SKIP_MODULES)
    defaulted = items is None
    if defaulted:
        items = list(DEFAULT_SKIPS)
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise KLError(f"{where}: {SOURCE}.{SKIP_MODULES} is {shown(items)}, not a list of module names or patterns (or "
                      "null): transformers refuses the config -- put back the config.json the weights came with, or "
                      "quantize the model again with `klconvert quantize --scheme nf4`")
    if len(items) > MAX_POLICY_ENTRIES:   # each is tried on every linear weight's name
        raise KLError(f"{where}: {SOURCE}.{SKIP_MODULES} holds {len(items):,} entries, past the "
                      f"{MAX_POLICY_ENTRIES:,} a quantizer writes; download the checkpoint again, or quantize the "
                      "release with `klconvert quantize --scheme nf4`")
    budget = RegexBudget()   # the entries share one matching budget, as a recipe's patterns do
    return BnbDeclared(tuple(skip_entry(item, f"{where}: {SOURCE}.{SKIP_MODULES}[{i}] {shown(item)} as transformers "
                                              "matches it", budget, SOURCE)
                             for i, item in enumerate(items)), defaulted)


def skip_entry(item: str, where: str, budget: RegexBudget, source: str) -> Skip:
    """One skip-list entry as transformers matches it (KLError, naming `where`, for one Python's re cannot compile
    so: a global flag not at the pattern's start, say)."""
    return Skip(item, Entry(f"re:(?:{item}){MODULE_BOUNDARY}", where, budget, source=source))
