"""The quantized folder's README.md: a model card naming the source, the schemes, the sizes, and how to run it."""
from __future__ import annotations

from klconvert.checkpoint.folder_files import RECIPE_FILE
from klconvert.convert.markdown_text import code_span, literal_text
from klconvert.convert.outputs import PlanTotals
from klconvert.convert.provenance import SourceOrigin
from klconvert.errors import controls_escaped
from klconvert.quant import Policy
from klconvert.shell_command import shell_command
from klconvert.units import count_text, counted, size_text

HUB = "https://huggingface.co"


def _front_matter(origin: SourceOrigin, policy: Policy) -> str:
    lines = ["---"]
    if origin.repo:
        lines += [f"base_model: {origin.repo}", "base_model_relation: quantized"]
    fmt = "bitsandbytes" if policy.kind == "nf4" else "compressed-tensors"
    lines += ["tags:", "- kimi_linear", f"- {fmt}", "- klconvert", "---"]
    return "\n".join(lines)


def model_card(title: str, origin: SourceOrigin, policy: Policy, totals: PlanTotals, shards: int,
               klconvert_version: str) -> str:
    """README.md text for the output folder `title`: the names in it (`title`, the source's) shown as they are, in
    whatever place, their control characters escaped (controls_escaped)."""
    shown_title = controls_escaped(title)
    if origin.bundled:
        source = f"{origin.describe()} (a small Kimi Linear trained on Shakespeare, shipped with klconvert)"
    elif origin.repo:
        source = f"[{origin.repo}]({HUB}/{origin.repo}/tree/{origin.commit}) at commit `{origin.commit}`"
    else:
        source = f"local folder {code_span(controls_escaped(origin.folder.name))} (no hub commit recorded)"
    if policy.kind == "nf4":
        fmt = "bitsandbytes NF4 (`quantization_config.quant_method: bitsandbytes`), double-quantized absmax"
    else:
        fmt = ("compressed-tensors `pack-quantized`: int weights with the scales of their scheme (below); "
               "activations stay 16-bit")
    rows = [f"| {scheme} | {tensors:,} | {count_text(params)} |"
            for scheme, (tensors, params) in sorted(totals.by_scheme.items(), key=lambda kv: -kv[1][1])]
    ignore = ", ".join(code_span(e.pattern) for e in policy.ignore) or "nothing"
    bits = f"{totals.quantized_bits_per_weight:.3f} over the quantized tensors, {totals.bits_per_weight:.3f} overall"
    return f"""{_front_matter(origin, policy)}

# {literal_text(shown_title)}

Moonshot AI's Kimi Linear, weight-quantized by klconvert {klconvert_version} from {source}.

| | |
|---|---|
| source | {literal_text(origin.describe())} |
| format | {fmt} |
| size | {size_text(totals.bytes_in)} -> {size_text(totals.bytes_out)} in {counted(shards, 'shard')} |
| bits per weight | {bits} |
| parameters | {count_text(totals.params)}, of which {count_text(totals.quantized_params)} quantized |

## How each tensor is stored

| scheme | tensors | parameters |
|---|---:|---:|
{chr(10).join(rows)}

"kept" tensors are stored exactly as in the source: the ignore list ({ignore}) and everything that is
not a linear weight (embedding, norms, `A_log`, `dt_bias`, the router's correction bias). The recipe
applied is in `{RECIPE_FILE}` (llm-compressor shape); `config.json` carries the matching
`quantization_config`. Tensor names are the released checkpoint's.

## Run it

```bash
{shell_command("klconvert", "run", "--model", f"path/to/{shown_title}", "--prompt-file", "prompt.txt")}
```

continues the text in `prompt.txt`; `--chat` sends it as a user turn through the folder's chat template instead
(for an instruct model).
"""
