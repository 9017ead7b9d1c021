"""Policy: which tensor gets which QuantScheme, decided by tensor name as compressed-tensors and vLLM match it."""
from __future__ import annotations

import difflib
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import regex
import yaml

try:   # Python's own parser of re patterns: reads a pattern's structure without compiling it
    from re import _parser as re_parser
except ImportError:   # Python 3.10
    import sre_parse as re_parser

from klconvert.checkpoint.folder_files import RECIPE_HEADER
from klconvert.checkpoint.name_map import in_memory_name, is_routed_expert, layout_names, released_name
from klconvert.errors import KLError, shown
from klconvert.quant.fused import fused_instances
from klconvert.quant.group_rules import CHANNEL, whole_groups_advice
from klconvert.quant.scheme import NF4_BLOCKSIZE, QuantScheme, compressed_tensors_config
from klconvert.release import EMBEDDING, HIGH_PRECISION

LINEAR = "Linear"  # the class-name target: every 2-D linear `.weight` (vLLM counts the router and convs as linear)

# Tensors the release keeps in high precision (klconvert/release.py); matched on the match key (below).
_PROTECTED = tuple((re.compile(pattern + "$"), what) for pattern, what in HIGH_PRECISION)
_EMBEDDING = re.compile(EMBEDDING + "$")


def match_key(tensor_name: str) -> str:
    """What targets and ignore entries are matched against: the module name for a `.weight`
    (as compressed-tensors and vLLM do), the full name for any other tensor."""
    return tensor_name.removesuffix(".weight") if tensor_name.endswith(".weight") else tensor_name


def match_keys(tensor_name: str) -> tuple[str, ...]:
    """The match keys of the tensor's names in each layout (name_map): its released one first, then those of the
    transformers and llm-compressor layouts, whose module names llm-compressor matches a recipe's ignore list against
    (transformers renames a released checkpoint's modules as it loads it)."""
    return (match_key(tensor_name), *(match_key(name) for name in layout_names(tensor_name)))


def converted_module(weight: str) -> str | None:
    """The module transformers' bitsandbytes quantizer makes a Linear4bit of for `weight` (a linear weight a layout
    holds whole) unless llm_int8_skip_modules lists it, by its in-memory name, which that list is matched against; None
    for a routed expert's weight, which it never converts (KimiLinearExperts holds them as 3-D parameters)."""
    return None if is_routed_expert(released_name(weight)) else match_key(in_memory_name(weight))


_NUMBER = re.compile(r"\d+")


def released_spelling(selected: Sequence[str], every: Sequence[str]) -> list[str]:
    """Ignore entries that select exactly the modules `selected` among `every` (match keys of released names): per
    form of name (its numbers aside), one re: pattern saying each of its numbers as the one selected, any, or those
    selected, where that selects no other module; else the names themselves."""
    forms: dict[str, list[str]] = {}
    for key in every:
        forms.setdefault(_NUMBER.sub("#", key), []).append(key)
    chosen: dict[str, list[str]] = {}
    for key in selected:
        chosen.setdefault(_NUMBER.sub("#", key), []).append(key)
    out = []
    for form, keys in chosen.items():
        if len(keys) == 1:
            out.append(keys[0])
            continue
        numbers = [set(column) for column in zip(*(_NUMBER.findall(key) for key in keys))]
        anywhere = [set(column) for column in zip(*(_NUMBER.findall(key) for key in forms[form]))]
        texts = form.split("#")
        pattern = re.escape(texts[0]) + "".join(
            (next(iter(values)) if len(values) == 1 else r"\d+" if values == anywhere[i]
             else f"(?:{'|'.join(sorted(values, key=int))})") + re.escape(text)
            for i, (values, text) in enumerate(zip(numbers, texts[1:])))
        exact = {key for key in forms[form] if re.fullmatch(pattern, key)} == set(keys)
        out.extend([f"re:{pattern}$"] if exact and len(pattern) < MAX_PATTERN_CHARS else keys)
    return out


def kept_in_high_precision(tensor_name: str) -> str | None:
    """What the tensor is ("the MoE router") where the release keeps it in high precision (release.HIGH_PRECISION):
    no recipe quantizes it, and a checkpoint that stores it packed is refused (vLLM builds it unquantized)."""
    key = match_key(tensor_name)
    return next((what for pattern, what in _PROTECTED if pattern.match(key)), None)


def is_linear_weight(tensor_name: str, shape: Sequence[int]) -> bool:
    """A 2-D `.weight` that is not an embedding: what the "Linear" target means by name alone."""
    return tensor_name.endswith(".weight") and len(shape) == 2 and not _EMBEDDING.match(match_key(tensor_name))


# Seconds of this thread's CPU the re: entries of one recipe may spend matching, all together over all the names
# each is tried on; past it a pattern is one that backtracks without end. A shipped recipe over the 48B's ~21,000
# tensor names takes ~0.9 s on a 2-core CI machine: counted in wall time against 2 s, a loaded machine (CI's tests
# on both cores) refused recipes/32gb.yaml and 48gb.yaml as backtracking.
REGEX_BUDGET_S = 5.0
# How long a re: pattern may be with its bounded repeats written out: the regex module compiles x{1000} as 1,000
# copies, so repeats nested in repeats take minutes and gigabytes; a tensor-name pattern is a few dozen.
MAX_PATTERN_EXPANSION = 10_000
# How long a re: pattern may be: a tensor-name pattern is a few dozen characters, and compiling one of 18,900 takes
# 0.2 s (a recipe's aliases repeat it thousands of times).
MAX_PATTERN_CHARS = 1_000
# How many targets and ignore entries one recipe or checkpoint config may hold over all its groups: they name a
# handful, and YAML aliases repeat whole lists and groups (200 groups of 1,000 aliased targets took 8.7 GB).
MAX_POLICY_ENTRIES = 1_000
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
# How many texts a pattern's literal start or end may spell out ((q|k|v)_(a|b)) before it is read as saying none.
_MAX_AFFIXES = 64


def _expansion(parsed) -> int:
    """How many items a parsed pattern holds with each bounded repeat written out (unbounded ones at their minimum)."""
    total = 0
    for op, av in parsed:
        name = op.name
        if name in _REPEATS:
            low, high, sub = av
            total += max(low if high == re_parser.MAXREPEAT else high, 1) * _expansion(sub)
        elif name == "SUBPATTERN":
            total += _expansion(av[-1])
        elif name == "BRANCH":
            total += sum(_expansion(alternative) for alternative in av[1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            total += _expansion(av[1])
        elif name == "ATOMIC_GROUP":
            total += _expansion(av)
        elif name == "GROUPREF_EXISTS":
            total += sum(_expansion(branch) for branch in av[1:] if branch is not None)
        else:
            total += 1
    return total


def _literal_options(op, av) -> list[str] | None:
    """The texts one parsed item matches where it is literal (a character, a class of listed characters, a plain
    group of literal alternatives), at most _MAX_AFFIXES of them; None otherwise."""
    name = op.name
    if name == "LITERAL":
        return [chr(av)]
    if name == "IN" and all(item.name == "LITERAL" for item, _ in av) and len(av) <= _MAX_AFFIXES:
        return [chr(code) for _, code in av]
    if name == "SUBPATTERN" and not av[1] and not av[2]:   # a group setting no flags of its own
        return _literal_texts(list(av[-1]))
    if name == "BRANCH":
        alternatives = [_literal_texts(list(alternative)) for alternative in av[1]]
        if any(texts is None for texts in alternatives):
            return None
        options = [text for texts in alternatives for text in texts]
        return options if len(options) <= _MAX_AFFIXES else None
    return None


def _literal_texts(items: list) -> list[str] | None:
    """The texts a parsed sequence matches where each of its items is literal (_literal_options); None otherwise."""
    texts = [""]
    for op, av in items:
        options = _literal_options(op, av)
        if options is None or len(texts) * len(options) > _MAX_AFFIXES:
            return None
        texts = [text + option for text in texts for option in options]
    return texts


@lru_cache(maxsize=MAX_POLICY_ENTRIES)   # a recipe's aliases repeat one expression
def _affixes(expression: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The texts a key the pattern matches (re.match: from its start) must start with, and those it must end with,
    from the literal items at the pattern's start and before its closing `$` or `\\Z`; () where it says none."""
    parsed = re_parser.parse(expression)
    if parsed.state.flags & (re.IGNORECASE | re.MULTILINE):
        return (), ()
    items = list(parsed)
    while items and items[0][0].name == "AT" and items[0][1].name in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        items = items[1:]
    starts = [""]
    for op, av in items:
        options = _literal_options(op, av)
        if options is None or len(starts) * len(options) > _MAX_AFFIXES:
            break
        starts = [start + option for start in starts for option in options]
    ends = [""]
    if items and items[-1][0].name == "AT" and items[-1][1].name in ("AT_END", "AT_END_STRING"):
        for op, av in reversed(items[:-1]):
            options = _literal_options(op, av)
            if options is None or len(ends) * len(options) > _MAX_AFFIXES:
                break
            ends = [option + end for end in ends for option in options]
        if items[-1][1].name == "AT_END":   # `$` matches before a closing newline too
            ends = [*ends, *(end + "\n" for end in ends)]
    # an empty text (nothing literal there, or an empty alternative) is no constraint on that side
    return (() if "" in starts else tuple(starts)), (() if "" in ends else tuple(ends))


@lru_cache(maxsize=MAX_POLICY_ENTRIES)
def _compiled(expression: str, source: str) -> regex.Pattern:
    """An re: entry's expression compiled (a recipe's aliases repeat one expression: it is checked once; the compiled
    pattern holds no state); ValueError saying what is wrong with it and what to do, for `source`'s author."""
    if len(expression) > MAX_PATTERN_CHARS:
        raise ValueError(f"is {len(expression):,} characters long, past the {MAX_PATTERN_CHARS:,} a tensor-name "
                         "pattern needs; simplify the pattern")
    try:
        with warnings.catch_warnings():
            # what Python's re reads as plain characters and the regex module (matching here) as a POSIX class or a
            # set operation: '[[:digit:]]', '--', '&&' -- the two would select other modules
            warnings.simplefilter("error", FutureWarning)
            re.compile(expression)
            expansion = _expansion(re_parser.parse(expression))
    except FutureWarning as e:
        raise ValueError(f"holds what Python's re reads as plain characters and other engines otherwise ({e}: "
                         "'[[', '--', '&&', '~~' or '||' in a set); escape them with a backslash") from None
    except (re.error, OverflowError, RecursionError) as e:  # huge repeats; groups nested deep
        hint = " (remember to escape '.' as '\\\\.' in YAML double quotes)" if source == "recipe" else ""
        raise ValueError(f"is not a valid regular expression ({e}); fix the pattern{hint}") from None
    if expansion > MAX_PATTERN_EXPANSION:
        raise ValueError(f"spells out {expansion:,} items with its repeats written out (repeats inside repeats), past "
                         f"the {MAX_PATTERN_EXPANSION:,} a tensor-name pattern needs; simplify the pattern")
    return regex.compile(expression, flags=regex.VERSION0)


@dataclass
class RegexBudget:
    """Seconds left to the re: entries that share it (one recipe's), spent as they match."""

    seconds: float = field(default_factory=lambda: REGEX_BUDGET_S)


@dataclass(frozen=True)
class Entry:
    """One targets/ignore item: `re:<regex>` (re.match on the match key), an exact module name, or
    "Linear"; `where` says where it was written ("recipe.yaml:12" or "default policy").

    A regex must compile under Python's re, as compressed-tensors and vLLM compile it; it is matched with the
    `regex` module in its re-compatible mode, which can be given a time limit (re's own match cannot be stopped)."""

    pattern: str
    where: str = field(default="default policy", compare=False)
    budget: RegexBudget = field(default_factory=RegexBudget, compare=False, repr=False)
    compiled: regex.Pattern | None = field(default=None, compare=False, repr=False)
    source: str = field(default="recipe", compare=False, repr=False)  # whose patterns share the budget, for errors
    # the texts a key it matches starts with, and those it ends with (_affixes); () where the pattern says none
    affixes: tuple[tuple[str, ...], tuple[str, ...]] = field(default=((), ()), init=False, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise KLError(f"{self.where}: a target or ignore entry must be a non-empty string, got "
                          f"{shown(self.pattern)}")
        if self.pattern == "re:":
            raise KLError(f"{self.where}: 're:' has nothing after 're:', so it would select every tensor; write the "
                          "pattern after 're:'")
        if self.pattern.startswith("re:"):
            start = time.thread_time()
            try:
                compiled = _compiled(self.pattern[3:], self.source)
                affixes = _affixes(self.pattern[3:])
            except ValueError as e:
                raise KLError(f"{self.where}: {shown(self.pattern)} {e}") from None
            finally:
                self.budget.seconds -= time.thread_time() - start
            if self.budget.seconds < 0:
                raise KLError(f"{self.where}: compiling the {self.source}'s patterns took past {REGEX_BUDGET_S:g} s; "
                              "write fewer, simpler patterns")
            object.__setattr__(self, "compiled", compiled)
            object.__setattr__(self, "affixes", affixes)

    def matches(self, key: str, linear: bool) -> bool:
        if self.pattern == LINEAR:
            return linear
        if self.compiled is not None:   # the regex module's timeout is wall time: a bound on each call past the budget
            start = time.thread_time()
            try:
                return self.compiled.match(key, timeout=max(self.budget.seconds, 0.0)) is not None
            except TimeoutError:
                raise KLError(f"{self.where}: {shown(self.pattern)} took the {self.source}'s patterns past "
                              f"{REGEX_BUDGET_S:g} s matching tensor names (the last {key[:80]!r}): it backtracks "
                              "without end (many repeats before a backreference, or repeats inside repeats); simplify "
                              "the pattern") from None
            finally:
                self.budget.seconds -= time.thread_time() - start
        return key == self.pattern

    def matches_alias(self, key: str) -> bool:
        """matches, for a tensor's name in another layout (match_keys): tried only where it starts and ends as the
        pattern's literal text says, so that the ~21,000 aliases of the 48B's names (most of them the routed
        experts' gate/up/down_proj) cost a recipe's entries next to none of the regex budget (matched in full, they
        took 32gb.yaml and 24 ordinary entries past it). Released names are matched in full: the budget bounds what
        compressed-tensors and vLLM, which cannot stop a match, would spend on them."""
        starts, ends = self.affixes
        return (not starts or key.startswith(starts)) and (not ends or key.endswith(ends)) and self.matches(key, False)


def selected_by_two_groups(name: str, first: tuple[str, Entry], second: tuple[str, Entry], remedy: str) -> KLError:
    """Name targets (exact or re:, not "Linear") of two config groups, each (group name, entry), both select `name`:
    compressed-tensors takes exact names, then re: patterns, each sorted; vLLM the first listed. `remedy` says what
    to do."""
    (group, entry), (other, other_entry) = first, second
    return KLError(f"{name} is selected by {shown(entry.pattern)} of {group:.40} ({entry.where}) and by "
                   f"{shown(other_entry.pattern)} of {other:.40} ({other_entry.where}); runtimes disagree on which "
                   f"wins -- {remedy}")


def _lists_nothing(entry: Entry, names: Sequence[str]) -> KLError:
    """The refusal of an ignore entry that lists none of the tensors `names` by any layout's name, with the module
    names nearest to it."""
    keys = sorted({key for name in names for key in match_keys(name)})
    said = entry.pattern.removeprefix("re:").replace("\\", "")
    nearest = " or ".join(difflib.get_close_matches(said, keys, n=2, cutoff=0.0))
    return KLError(f"{entry.where}: ignore entry {shown(entry.pattern)} names no module of this model in the released, "
                   "transformers or llm-compressor layout, so it would keep nothing unquantized; fix it (the nearest "
                   f"module names: {nearest}) or remove it")


@dataclass(frozen=True)
class Group:
    """A config group: the modules its targets select are stored with `scheme`."""

    name: str
    targets: tuple[Entry, ...]
    scheme: QuantScheme


@dataclass(frozen=True)
class Policy:
    """Config groups plus an ignore list, matched like compressed-tensors / vLLM: ignore wins, an entry listing a
    module by its name in any layout (llm-compressor's are transformers'); a name target (exact or `re:`) beats
    "Linear"; two groups whose name targets both select a module are an error, because compressed-tensors and vLLM
    break that tie differently.

    strict: a target that selects no tensor, or an ignore entry that lists none, is an error (recipes); otherwise
    check_against drops the target.
    keep_fused: names of vLLM fused modules (quant/fused.py) kept whole as released; check_against turns them into
    an ignore entry naming each member, since a name pattern alone cannot tell a KDA q_proj from an MLA one.
    group_size_flag: the command-line flag (--group-size) that set every int group's group size, where the policy
    comes from the flags: a group size that leaves a weight a partial group is refused as that flag's, offering the
    sizes that divide every weight the flags quantize -- not as a recipe group's, there being no targets to edit.
    """

    groups: tuple[Group, ...]
    ignore: tuple[Entry, ...] = ()
    strict: bool = True
    keep_fused: tuple[str, ...] = ()
    group_size_flag: str | None = field(default=None, compare=False)
    # each tensor's verdict of _ignores, by name: found once, the entries being matched against each layout's name
    _ignored: dict[str, bool] = field(default_factory=dict, init=False, compare=False, repr=False)
    # the scheme of each tensor (name, shape) the policy was checked against (check_against's result: the scheme it
    # found for it, or None): what scheme_for answers for it, so the tensors are matched once, not again per caller
    # (held_as_written, the converter) -- the 48B's 20,493 names took ~0.25 s of each `klconvert plan --bits`. The
    # checked policy drops only targets that selected no tensor and keeps the ignore list, so a match found with the
    # policy checked is the one found before.
    _checked_schemes: dict[tuple[str, tuple[int, ...]], QuantScheme | None] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        kinds = {g.scheme.kind for g in self.groups}
        if len(kinds) > 1:
            g = next(g for g in self.groups if g.scheme.kind == "nf4")
            raise KLError(f"{g.targets[0].where if g.targets else 'recipe'}: group {g.name} is nf4 but others are "
                          "integer; one checkpoint holds either compressed-tensors or bitsandbytes weights, not both")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise KLError(f"config group names must be unique, got {names}")
        for e in self.ignore:
            if e.pattern == LINEAR:
                raise KLError(f"{e.where}: ignore takes module names or re: patterns, not {LINEAR!r}")

    @property
    def kind(self) -> str:
        return self.groups[0].scheme.kind if self.groups else "int"

    def _ignores(self, tensor_name: str) -> bool:
        """Whether an ignore entry lists the tensor by its name in any layout (match_keys)."""
        if tensor_name not in self._ignored:
            key, *others = match_keys(tensor_name)
            self._ignored[tensor_name] = any(e.matches(key, False) or any(e.matches_alias(other) for other in others)
                                             for e in self.ignore)
        return self._ignored[tensor_name]

    def _resolve(self, tensor_name: str, shape: Sequence[int]) -> tuple[Group, list[Entry]] | None:
        """The group that stores this tensor and the targets that selected it, or None; KLError when the
        match is ambiguous or selects a tensor that cannot or must not be quantized."""
        key, linear = match_key(tensor_name), is_linear_weight(tensor_name, shape)
        if self._ignores(tensor_name):
            return None
        hits = [(g, e) for g in self.groups for e in g.targets if e.pattern != LINEAR and e.matches(key, linear)]
        if not hits:
            hits = [(g, e) for g in self.groups for e in g.targets if e.pattern == LINEAR and e.matches(key, linear)]
        if not hits:
            return None
        group, entry = hits[0]
        for other, other_entry in hits[1:]:
            if other.name != group.name:
                raise selected_by_two_groups(tensor_name, (group.name, entry), (other.name, other_entry),
                                             "narrow one pattern or add the module to the other group's ignore")
        what = kept_in_high_precision(tensor_name)
        if what is not None:
            raise KLError(f"{entry.where}: target {shown(entry.pattern)} of {group.name} would quantize "
                          f"{tensor_name} ({what}), which must stay in high precision; narrow the target or add it to "
                          "ignore")
        if not linear:
            raise KLError(f"{entry.where}: target {shown(entry.pattern)} of {group.name} selects {tensor_name} "
                          f"{list(shape)}, which is not a 2-D linear weight; narrow the target or add it to ignore")
        if group.scheme.kind == "nf4" and shape[0] * shape[1] % NF4_BLOCKSIZE:
            raise KLError(f"{tensor_name} {list(shape)} does not fill whole NF4 blocks of {NF4_BLOCKSIZE}; "
                          f"add it to ignore ({entry.where})")
        return group, [e for g, e in hits if g.name == group.name]

    def scheme_for(self, tensor_name: str, shape: Sequence[int]) -> QuantScheme | None:
        """The scheme to store this tensor with, or None to keep it as it is (in whole groups of its group size where
        check_against passed the policy for the checkpoint)."""
        key = (tensor_name, tuple(shape))
        if key in self._checked_schemes:
            return self._checked_schemes[key]
        hit = self._resolve(tensor_name, shape)
        return hit[0].scheme if hit else None

    def check_against(self, names_and_shapes: Iterable[tuple[str, Sequence[int]]]) -> Policy:
        """Check the policy against a checkpoint's tensor list before converting anything.

        KLError for: a match scheme_for refuses; a linear weight neither targeted nor ignored (vLLM and
        bitsandbytes need every linear layer accounted for); a group size that does not divide the input dim of a
        weight stored in groups of it; under `strict`, a target that selects no tensor or an ignore entry that
        lists none in any layout; routed experts that transformers would read with another group's scheme. Returns
        the policy without unused targets (and groups left empty), keep_fused spelled out in ignore, and each ignore
        entry that lists modules by their transformers or llm-compressor names followed by entries listing them by
        their released ones (which the written folder holds, and vLLM matches) -- the one to apply and to write as
        recipe.yaml.
        """
        names_and_shapes = [(name, tuple(shape)) for name, shape in names_and_shapes]
        if self.keep_fused:
            return replace(self, ignore=(*self.ignore, *self._kept_whole(names_and_shapes)),
                           keep_fused=()).check_against(names_and_shapes)
        ignore = self._ignore_as_released([name for name, _ in names_and_shapes])
        if ignore == self.ignore and self.kind == "nf4":
            ignore = self._ignore_in_memory(names_and_shapes)
        if ignore != self.ignore:
            return replace(self, ignore=ignore).check_against(names_and_shapes)
        used: set[tuple[str, str]] = set()
        experts_group: Group | None = None
        in_groups: dict[int | str, list[tuple[str, tuple[int, ...], Group, Entry]]] = {}
        schemes: dict[tuple[str, tuple[int, ...]], QuantScheme | None] = {}
        for name, shape in names_and_shapes:
            hit = self._resolve(name, shape)
            schemes[name, shape] = hit[0].scheme if hit else None
            if hit:
                used.update((hit[0].name, e.pattern) for e in hit[1])
                if is_routed_expert(name):
                    experts_group = hit[0]
                if hit[0].scheme.kind == "int" and hit[0].scheme.group_size != CHANNEL:
                    # the flags set one size for all their groups, a recipe one for each group
                    key = hit[0].scheme.group_size if self.group_size_flag else hit[0].name
                    in_groups.setdefault(key, []).append((name, shape, hit[0], hit[1][0]))
            elif is_linear_weight(name, shape) and not self._ignores(name):
                raise KLError(f"{name} {list(shape)} is a linear weight that no target selects and no ignore entry "
                              "lists; runtimes would not know how it is stored -- add it to a group's targets or "
                              "to ignore")
        groups = []
        for g in self.groups:
            unused = [e for e in g.targets if (g.name, e.pattern) not in used]
            if unused and self.strict:
                e = unused[0]
                raise KLError(f"{e.where}: target {shown(e.pattern)} of {g.name} selects no tensor of this "
                              "checkpoint (after ignore); fix the pattern or remove it")
            kept = tuple(e for e in g.targets if (g.name, e.pattern) in used)
            if kept:
                groups.append(replace(g, targets=kept))
        checked = replace(self, groups=tuple(groups))
        checked._ignored.update(self._ignored)   # the same ignore list
        checked._checked_schemes.update(schemes)   # the same matches: only targets that selected nothing were dropped
        for stored in in_groups.values():
            checked._refuse_partial_group(stored, experts_group)
        if experts_group is not None and checked.kind == "int":
            checked._refuse_transformers_experts_misread(experts_group)
        return checked

    def _ignore_as_released(self, names: Sequence[str]) -> tuple[Entry, ...]:
        """The ignore list with each entry that lists tensors of `names` by another layout's name only followed by
        entries listing those by their released names (released_spelling); KLError, under `strict`, for an entry
        that lists none of them in any layout (compressed-tensors applies it to nothing without a word)."""
        listing: set[int] = set()   # the entries that list a tensor in some layout
        by_released: set[str] = set()   # the match keys an entry lists by their released names
        elsewhere: dict[int, list[str]] = {}   # each entry's match keys that it lists by another layout's name only
        for name in names:
            key, *others = match_keys(name)
            self._ignored[name] = False
            for i, e in enumerate(self.ignore):
                if e.matches(key, False):
                    listing.add(i)
                    by_released.add(key)
                elif any(e.matches_alias(other) for other in others):
                    listing.add(i)
                    elsewhere.setdefault(i, []).append(key)
                else:
                    continue
                self._ignored[name] = True
        unlisting = [e for i, e in enumerate(self.ignore) if i not in listing]
        if unlisting and self.strict:
            raise _lists_nothing(unlisting[0], names)
        only_elsewhere = {i: left for i, keys in elsewhere.items()
                          if (left := [key for key in keys if key not in by_released])}
        if not only_elsewhere:
            return self.ignore
        out = self._followed_by(only_elsewhere, [match_key(name) for name in names])
        if len(out) > MAX_POLICY_ENTRIES:
            e = next(self.ignore[i] for i in only_elsewhere)
            raise KLError(f"{e.where}: ignore entry {shown(e.pattern)} lists modules by their transformers or "
                          f"llm-compressor names only, too many ({len(out) - len(self.ignore):,}) to list by the "
                          "released names the written folder holds; write a pattern that matches the released names "
                          r"too (e.g. re:.*\.(block_sparse_moe|mlp)\.shared_experts\..*)")
        return out

    def _followed_by(self, added: Mapping[int, Sequence[str]], every: Sequence[str]) -> tuple[Entry, ...]:
        """The ignore list with each entry i followed by entries listing the names added[i] among `every`
        (released_spelling), at its line."""
        out: list[Entry] = []
        for i, e in enumerate(self.ignore):
            out.append(e)
            out.extend(Entry(pattern, e.where, e.budget, source=e.source)
                       for pattern in released_spelling(added.get(i, []), every))
        return tuple(out)

    def _ignore_in_memory(self, names_and_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[Entry, ...]:
        """The ignore list with each entry that lists linear modules transformers would convert (converted_module)
        where transformers does not see it list them -- by other names than their in-memory ones, or as
        should_convert_module matches a skip entry (from a name's start to a module boundary, or a suffix: Skip) --
        followed by entries listing them by those names (released_spelling): an nf4 folder writes the list as
        llm_int8_skip_modules, and a float module transformers misses there it builds as a Linear4bit with no quant
        state to load. KLError for an entry transformers cannot compile so."""
        from klconvert.quant.bnb_declared import skip_entry   # (bnb_declared reads its entries with this module)

        skips = [skip_entry(e.pattern.removeprefix("re:"), f"{e.where}: ignore entry {shown(e.pattern)}, written to "
                            "an nf4 folder's llm_int8_skip_modules, as transformers matches it", e.budget, e.source)
                 for e in self.ignore]
        converted = {name: converted_module(name) for name, shape in names_and_shapes
                     if is_linear_weight(name, shape) and kept_in_high_precision(name) is None}
        converted = {name: module for name, module in converted.items() if module is not None}
        missed: dict[int, list[str]] = {}   # each entry's modules that transformers sees no entry list
        for name, module in converted.items():
            if self._ignores(name) and not any(skip.matches(module) for skip in skips):
                first = next(i for i, e in enumerate(self.ignore) if any(e.matches(key, False)
                                                                         for key in match_keys(name)))
                missed.setdefault(first, []).append(module)
        return self._followed_by(missed, list(converted.values())) if missed else self.ignore

    def _refuse_partial_group(self, stored: list[tuple[str, tuple[int, ...], Group, Entry]],
                              experts: Group | None) -> None:
        """KLError when one of the weights `stored` at one group size (each with its shape, the group that stores it
        and the target that selected it) is left a partial group, offering the sizes that divide every one's input
        dim -- only the one that keeps the scheme transformers reads the routed experts with that of `experts`, the
        group storing them, where the partial group is one of the two (another would meet that refusal next); the
        refusal of transformers' reading itself where no size does."""
        partial = next(((name, shape, group, entry) for name, shape, group, entry in stored
                        if shape[1] % group.scheme.group_size), None)
        if partial is None:
            return
        name, shape, group, entry = partial
        size, in_dims = group.scheme.group_size, [stored_shape[1] for _, stored_shape, _, _ in stored]
        if self.group_size_flag:
            raise KLError(f"{self.group_size_flag} {size} does not divide {shape[1]}, the input dim of {name} "
                          f"{list(shape)}; "
                          + whole_groups_advice(in_dims, self.group_size_flag, "every weight the flags quantize"))
        said = f"{name} (target {shown(entry.pattern)} of {group.name}, {entry.where}): group size {size} does not " \
               f"divide the input dim of shape {list(shape)}; "
        reader, reader_entry, why = self._experts_reader() if experts is not None else (None, None, "")
        if reader is not None and reader.name != experts.name and group.name in (reader.name, experts.name):
            other = experts if group.name == reader.name else reader
            alike = other.scheme.group_size
            if (replace(group.scheme, group_size=alike) != other.scheme or alike == CHANNEL
                    or any(in_dim % alike for in_dim in in_dims)):
                raise self._experts_misread(experts, reader, reader_entry, why)   # no group size reads them alike
            raise KLError(f"{said}use group_size {alike}, group {other.name}'s: transformers reads the routed experts "
                          f"with the scheme of group {reader.name} (its target {shown(reader_entry.pattern)} is the "
                          f"first that {why}) and group {experts.name} stores them, so the two must stay alike; or "
                          "leave this tensor out of the recipe's targets")
        raise KLError(said + whole_groups_advice(in_dims, "group_size", f"every tensor {group.name} selects")
                      + "; or leave this tensor out of the recipe's targets")

    def _kept_whole(self, names_and_shapes) -> list[Entry]:
        """One ignore entry per kept fused module: `re:(parent|...)\\.(\\w+\\.)?(member|...)$` over its instances."""
        entries = []
        for fused in self.keep_fused:
            found = [i for i in fused_instances(names_and_shapes) if i.module.name == fused]
            if not found:
                continue
            parents = "|".join(re.escape(i.parent) for i in found)
            members = "|".join(fused_member for fused_member in found[0].module.members)
            # members may sit one module deeper in the transformers layout (self_attn.forget_gate.f_a_proj)
            entries.append(Entry(f"re:({parents})\\.(\\w+\\.)?({members})$", f"default policy (keep {fused} whole)"))
        return entries

    def _written_groups(self) -> list[Group]:
        # groups with a "Linear" target go last: compressed-tensors' model-free dequantizer takes the
        # first group that matches and treats "Linear" as everything; vLLM and transformers let a
        # name target win wherever it is listed
        return sorted(self.groups, key=lambda g: any(e.pattern == LINEAR for e in g.targets))

    def _experts_reader(self) -> tuple[Group, Entry, str]:
        """The group whose scheme transformers (5.17 to 5.24, integrations/compressed_tensors.py get_experts_scheme)
        reads every routed expert with, the target that makes it so, and why: the first group with a `re:` target
        containing "experts", else the first with a plain (non-`re:`) target."""
        written = self._written_groups()
        mention = [g for g in written if any(e.pattern.startswith("re:") and "experts" in e.pattern for e in g.targets)]
        plain = [g for g in written if any(not e.pattern.startswith("re:") for e in g.targets)]
        chosen = (mention or plain or written)[0]
        entry = next((e for e in chosen.targets if e.pattern.startswith("re:") and "experts" in e.pattern),
                     next((e for e in chosen.targets if not e.pattern.startswith("re:")), chosen.targets[0]))
        return chosen, entry, 'mentions "experts"' if mention else "is not a re: pattern"

    def _refuse_transformers_experts_misread(self, experts: Group) -> None:
        """KLError when transformers reads the routed experts (_experts_reader) with another scheme than that of
        `experts`, the group that stores them."""
        reader, entry, why = self._experts_reader()
        if reader.name != experts.name and reader.scheme != experts.scheme:
            raise self._experts_misread(experts, reader, entry, why)

    @staticmethod
    def _experts_misread(experts: Group, reader: Group, entry: Entry, why: str) -> KLError:
        """The refusal of transformers reading the routed experts, stored by `experts`, with the scheme of `reader`
        (for the target `entry`, which `why`)."""
        return KLError(f"{entry.where}: transformers reads the routed experts with the scheme of group {reader.name} "
                       f"({reader.scheme.describe()}: its target {shown(entry.pattern)} is the first that {why}), but "
                       f"group {experts.name} stores them ({experts.scheme.describe()}); write the other groups' "
                       'targets as re: patterns without the word "experts" (e.g. re:^lm_head$, '
                       r"re:.*\.shared_\w+\.down_proj$)")

    def quantization_config(self) -> dict:
        """config.json's `quantization_config`: compressed-tensors for int groups, bitsandbytes for nf4."""
        if self.kind == "nf4":
            from klconvert.quant.nf4 import bnb_quantization_config   # with torch: a plan reads a policy without it

            return bnb_quantization_config([e.pattern.removeprefix("re:") for e in self.ignore])
        return compressed_tensors_config([(g.name, [e.pattern for e in g.targets], g.scheme)
                                          for g in self._written_groups()],
                                         [e.pattern for e in self.ignore])

    def to_recipe_yaml(self, runtime: Mapping | None = None) -> str:
        """The policy as an llm-compressor-shaped recipe that load_recipe reads back (nf4 as `type: nf4`)."""
        modifier = {
            "ignore": [e.pattern for e in self.ignore],
            "config_groups": {g.name: {"targets": [e.pattern for e in g.targets], "weights": g.scheme.weights_args()}
                              for g in self.groups},
        }
        doc = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}
        if runtime:
            doc["runtime"] = dict(runtime)
        return RECIPE_HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
