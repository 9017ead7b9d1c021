"""load_recipe: an llm-compressor-shaped recipe YAML -> Recipe (Policy + runtime section), checked line by line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from klconvert.checkpoint.regular_file import open_regular
from klconvert.errors import ERROR_CHARS, KLError, either, few, not_utf8, shown
from klconvert.quant.group_rules import CHANNEL, SUPPORTED_BITS, unsupported_observer
from klconvert.quant.policy import MAX_POLICY_ENTRIES, Entry, Group, Policy, RegexBudget
from klconvert.quant.scheme import KINDS, NF4_BLOCKSIZE, NF4_FIXED, NF4_SAID, PACKED_FORMAT, QuantScheme
from klconvert.recipes import shipped_names, shipped_recipe

MAX_GROUP_NAME_CHARS = 200  # a config group's name ("group_0", "experts"), said in every message about the group
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; a larger --recipe is the wrong file (or /dev/zero)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TOP_KEYS = ("<name>_stage", "runtime")
_MODIFIER_KEYS = ("ignore", "config_groups")
_GROUP_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")
_WEIGHT_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "observer", "actorder")
_OBSERVERS = ("minmax", "memoryless_minmax", "static_minmax", "mse")  # llm-compressor's names: min-max, or MSE
# klconvert's own section: what the runtime plans for. Types only here; the runtime checks values.
_RUNTIME = {"max_context": int, "batch": int, "mla_cache_dtype": str, "kda_state_dtype": str,
            "gpu_memory": (str, int, float)}


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: the quantization policy and the optional `runtime:` settings."""

    policy: Policy
    runtime: dict = field(default_factory=dict)
    path: str = ""
    runtime_lines: dict = field(default_factory=dict, compare=False)   # each runtime key's "path:line"

    def where(self, key: str) -> str:
        """Where the runtime: section's `key` is written ("recipe.yaml:12"), for an error about its value."""
        return self.runtime_lines.get(key, self.path)


class _Reader:
    """Walks yaml.compose nodes so that every error names the file and line."""

    def __init__(self, path: str):
        self.path = path
        self._constructor = yaml.SafeLoader("")
        self._regex_budget = RegexBudget()   # the recipe's re: entries share one matching budget
        self._entries = 0   # targets and ignore entries read so far, aliases counted as often as they are used

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str):
        raise KLError(f"{self.where(node)}: {message}")

    def scalar(self, node: yaml.Node, what: str, types):
        types = types if isinstance(types, tuple) else (types,)
        try:
            value = self._constructor.construct_object(node) if isinstance(node, yaml.ScalarNode) else node
        except (yaml.YAMLError, ValueError) as e:  # an unknown !!tag (said whole: cut); an int of 4,300+ digits
            self.fail(node, f"{what}: {str(getattr(e, 'problem', None) or e)[:ERROR_CHARS]}")
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if ok and isinstance(value, str) and not value.isprintable():  # would reach the terminal and the model card
            self.fail(node, f"{what} {value[:80]!r} holds a control character or an unpaired surrogate; a name or "
                            "pattern is plain text")
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            got = shown(value) if isinstance(node, yaml.ScalarNode) else f"a {type(node).__name__[:-4].lower()}"
            self.fail(node, f"{what} should be {names}, got {got}")
        return value

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None) -> dict:
        """{key: (key node, value node)}; unknown and repeated keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} should be a mapping")
        out = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:   # safe_load would merge the aliased mapping in; compose leaves it a key
                self.fail(key_node, f"{what} uses a YAML merge key (<<), which a recipe does not take; write its keys "
                                    "out")
            key = self.scalar(key_node, f"a key of {what}", str)
            if key in out:
                self.fail(key_node, f"{what} repeats the key {shown(key)}")
            if allowed is not None and key not in allowed:
                self.fail(key_node, f"unknown key {shown(key)} in {what}; expected {', '.join(allowed)}")
            out[key] = (key_node, value_node)
        return out

    def entries(self, node: yaml.Node, what: str) -> tuple[Entry, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} should be a list of module names or re: patterns")
        self._entries += len(node.value)
        if self._entries > MAX_POLICY_ENTRIES:
            self.fail(node, f"{what} brings the recipe to {self._entries:,} target and ignore entries, past the "
                            f"{MAX_POLICY_ENTRIES:,} a recipe needs (YAML aliases count each time they are used); "
                            "name modules with re: patterns instead")
        return tuple(Entry(self.scalar(item, f"an item of {what}", str), self.where(item), self._regex_budget)
                     for item in node.value)

    def single(self, node: yaml.Node, what: str, suffix: str) -> tuple[yaml.Node, yaml.Node]:
        """The one `<name><suffix>` key of a mapping (llm-compressor's stage / modifiers level)."""
        items = self.mapping(node, what, None)
        if len(items) != 1 or not next(iter(items)).endswith(suffix):
            self.fail(node, f"{what} should hold exactly one key named '<name>{suffix}', got {few(items)}")
        return next(iter(items.values()))

    def weights(self, node: yaml.Node, what: str) -> QuantScheme:
        w = self.mapping(node, what, _WEIGHT_KEYS)

        def get(key, types, default):
            return self.scalar(w[key][1], f"{what}.{key}", types) if key in w else default

        bits = get("num_bits", int, None)
        if bits is None:
            self.fail(node, f"{what} needs num_bits ({either(SUPPORTED_BITS)})")
        kind = get("type", str, "int")
        symmetric = get("symmetric", bool, True)
        strategy = get("strategy", (str, type(None)), None)
        group_size = get("group_size", (int, type(None)), None)
        if get("dynamic", bool, False):
            self.fail(w["dynamic"][1], "dynamic weight quantization is not supported; remove `dynamic: true`")
        observer = get("observer", (str, type(None)), "minmax") or "minmax"
        if observer not in _OBSERVERS:
            self.fail(w["observer"][1], unsupported_observer(observer))
        observer = "mse" if observer == "mse" else "minmax"   # llm-compressor's min-max observers are one to klconvert
        if get("actorder", (str, type(None)), None) is not None:
            self.fail(w["actorder"][1], "actorder needs calibration (GPTQ), which klconvert does not run; remove it")
        if kind not in KINDS:
            self.fail(w["type"][1], f"type {shown(kind)} is not supported; use {either(KINDS)}")
        if kind == "nf4":
            if strategy not in ("group", None):
                self.fail(w["strategy"][1], f"strategy {shown(strategy)} is not nf4's; nf4 is quantized in groups "
                                            f"(blocks) of {NF4_BLOCKSIZE}: use strategy group or leave it out")
            group_size = NF4_BLOCKSIZE if group_size is None else group_size
            given = {"bits": ("num_bits", bits), "group_size": ("group_size", group_size),
                     "symmetric": ("symmetric", symmetric), "observer": ("observer", observer)}
            for name, fixed in NF4_FIXED.items():
                key, value = given[name]
                if value != fixed:   # said at the key, in the recipe's own words (QuantScheme's are the API's)
                    self.fail(w[key][1], f"{NF4_SAID}, not {key} {w[key][1].value}; set {key}: {str(fixed).lower()}")
        elif strategy == "channel" or (strategy is None and group_size == -1):
            # group_size -1 as the recipe spells it (compressed-tensors' channel); CHANNEL is the scheme's sentinel
            if group_size not in (None, -1):
                self.fail(w["group_size"][1], f"strategy channel takes no group_size, got {shown(group_size)}")
            group_size = CHANNEL
        elif strategy in ("group", None):
            if group_size is None or group_size <= 0:
                self.fail(node, f"{what} needs a positive group_size for strategy group (or strategy: channel)")
        else:
            self.fail(w["strategy"][1], f"strategy {shown(strategy)} is not supported; use group or channel")
        try:
            return QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric, kind=kind, observer=observer)
        except KLError as e:
            self.fail(node, str(e))


def _compose(text: str, path: str, advice: str = "") -> yaml.Node | None:
    """Recipe text as YAML nodes (no object is built from them); KLError naming `path` and the line for text that is
    no YAML, `advice` appended to it."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        said = str(getattr(e, "problem", None) or e)[:ERROR_CHARS]   # it may quote an alias or a tag of any length
        raise KLError(f"{path}{line}: not valid YAML ({said}){advice}") from None
    except RecursionError:  # the composer recurses once per level; a recipe is five levels deep
        raise KLError(f"{path}: nested too deeply to be a recipe{advice}") from None


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Parse recipe text; every error is a KLError naming `path` and the line."""
    r = _Reader(path)
    root = _compose(text, path, "; fix the recipe")
    if root is None:
        raise KLError(f"{path}: the recipe is empty; it needs a '<name>_stage:' section")
    top = r.mapping(root, "the recipe", None)
    stages = [k for k in top if k.endswith("_stage")]
    for key, (key_node, _) in top.items():
        if key != "runtime" and not key.endswith("_stage"):
            r.fail(key_node, f"unknown key {shown(key)} at the top of the recipe; expected {', '.join(_TOP_KEYS)}")
    if len(stages) != 1:
        r.fail(root, f"the recipe should hold exactly one '<name>_stage' section, got {few(stages)}")
    _, modifiers = r.single(top[stages[0]][1], stages[0], "_modifiers")
    found = r.mapping(modifiers, "the modifiers", ("QuantizationModifier",))
    if "QuantizationModifier" not in found:
        r.fail(modifiers, "the modifiers should hold a QuantizationModifier")
    qm_node = found["QuantizationModifier"][1]
    qm = r.mapping(qm_node, "QuantizationModifier", _MODIFIER_KEYS)
    if "config_groups" not in qm:
        r.fail(qm_node, "QuantizationModifier needs config_groups (targets + weights per group)")
    ignore = r.entries(qm["ignore"][1], "ignore") if "ignore" in qm else ()

    groups = []
    for name, (name_node, group_node) in r.mapping(qm["config_groups"][1], "config_groups", None).items():
        if len(name) > MAX_GROUP_NAME_CHARS:   # it names the group in every message about it
            r.fail(name_node, f"config group name {shown(name)} is {len(name):,} characters long; give it a name of at "
                              f"most {MAX_GROUP_NAME_CHARS}")
        g = r.mapping(group_node, f"config group {name!r}", _GROUP_KEYS)
        for key in ("targets", "weights"):
            if key not in g:
                r.fail(group_node, f"config group {name!r} needs {key}")
        for key in ("input_activations", "output_activations"):
            if key in g:
                r.scalar(g[key][1], f"{name}.{key} (activations stay unquantized)", type(None))
        if "format" in g and r.scalar(g["format"][1], f"{name}.format", str) != PACKED_FORMAT:
            r.fail(g["format"][1], f"format should be {PACKED_FORMAT}")
        targets = r.entries(g["targets"][1], f"{name}.targets")
        if not targets:
            r.fail(g["targets"][1], f"config group {name!r} has no targets")
        groups.append(Group(name, targets, r.weights(g["weights"][1], f"{name}.weights")))
    if not groups:
        r.fail(qm["config_groups"][1], "config_groups is empty")

    return _with_runtime(r, top, Policy(groups=tuple(groups), ignore=ignore, strict=True), path)


def _with_runtime(r: _Reader, top: dict, policy: Policy, path: str) -> Recipe:
    """The recipe of `policy` and the `runtime:` section of the mapping `top` (its types checked, and the counts
    positive; the runtime checks the other values)."""
    runtime, lines = {}, {}
    if "runtime" in top:
        for key, (_, value_node) in r.mapping(top["runtime"][1], "runtime", tuple(_RUNTIME)).items():
            runtime[key], lines[key] = r.scalar(value_node, f"runtime.{key}", _RUNTIME[key]), r.where(value_node)
            if _RUNTIME[key] is int and runtime[key] <= 0:
                r.fail(value_node, f"runtime.{key} should be positive, got {shown(runtime[key])}")
    return Recipe(policy=policy, runtime=runtime, path=path, runtime_lines=lines)


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a recipe file, or a shipped recipe by name (klconvert.recipes; see parse_recipe)."""
    path = shipped_recipe(Path(path)) or path
    try:
        with open_regular(path) as f:   # a FIFO's open would wait for a writer
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise KLError(f"{path}: over {MAX_RECIPE_BYTES >> 10} KiB, far larger than a recipe; check the --recipe "
                          "path")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise KLError(f"{path}: no such recipe file; check the --recipe path, or name a shipped recipe: "
                      f"{', '.join(shipped_names())}") from None
    except UnicodeDecodeError as e:
        raise KLError(f"{not_utf8(path, e.start)}, so no recipe; check the --recipe path") from None
    except OSError as e:
        raise KLError(f"{path}: cannot read the recipe ({e.strerror}); check the --recipe path") from None
    return parse_recipe(text, str(path))


def parse_runtime_section(text: str, path: str) -> Recipe:
    """The `runtime:` section of recipe text, its types checked as parse_recipe checks them, as a Recipe of no policy
    (its runtime {} where the text holds none). Nothing else in the text is read: a model folder's recipe.yaml, whose
    runtime: section `klconvert plan` takes for its defaults, is provenance, and may be another tool's (llm-compressor
    writes its GPTQ recipes there). KLError naming `path` (and the line) for text that is no YAML, or a runtime:
    section that is malformed."""
    r = _Reader(path)
    root = _compose(text, path)
    top = r.mapping(root, "the recipe", None) if isinstance(root, yaml.MappingNode) else {}
    return _with_runtime(r, top, Policy(groups=()), path)
