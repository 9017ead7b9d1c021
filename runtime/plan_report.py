"""`klconvert plan`: build a MemoryPlan for a folder or a preset and render it as a table."""
from __future__ import annotations

from pathlib import Path

import torch

from klconvert.config import KimiLinearConfig
from klconvert.runtime.memory_plan import MemoryPlan, weight_bytes
from klconvert.synth.presets import preset_config


def plan_for(model: Path | None = None, preset: str | None = None, layers: int | None = None, batch: int = 1,
             context: int = 131072, bits: int | None = None, group_size: int = 128,
             memory_limit: int | None = None, dtype: torch.dtype = torch.bfloat16) -> MemoryPlan:
    """The plan the runtime would make on a GPU for this model, context and batch."""
    if model is not None:
        config = KimiLinearConfig.from_file(Path(model) / "config.json")
    else:
        config = KimiLinearConfig.from_dict(preset_config(preset, layers), where=f"preset {preset}")
    return MemoryPlan(config, batch=batch, context=context, weight_bytes=weight_bytes(config, dtype, bits, group_size),
                      act_dtype=dtype, mla_cache_dtype=dtype, memory_limit=memory_limit)


def _size(n: int) -> str:
    if n < 2**20:
        return f"{n:,} B"
    if n < 2**30:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**30:,.2f} GiB"


def render_plan(p: MemoryPlan, title: str) -> str:
    """The plan as an aligned text table."""
    rows: list[tuple[str, str]] = []
    for category, n in p.weight_bytes.items():
        if n:
            rows.append((f"  weights: {category}", _size(n)))
    rows += [
        ("weights total", _size(p.weights)),
        ("KDA recurrent state / sequence", f"{_size(p.kda_state_bytes_per_seq)} ({p.kda_state_bytes_per_seq / 1e6:.1f} MB)"),
        ("KDA conv tails / sequence", _size(p.conv_bytes_per_seq)),
        (f"state x batch {p.batch}", _size(p.state_bytes)),
        ("MLA latent cache / token", f"{p.mla_bytes_per_token:,} B"),
        (f"MLA latent cache @ {p.context:,} tokens x {p.batch}", _size(p.mla_cache_bytes)),
        ("workspace (prefill segment, logits)", _size(p.workspace)),
        ("total", _size(p.total)),
    ]
    if p.memory_limit is not None:
        headroom = p.headroom
        rows += [("GPU memory", _size(p.memory_limit)),
                 ("headroom", ("-" + _size(-headroom) + "  (does NOT fit)") if headroom < 0
                  else f"{_size(headroom)} ({100 * headroom / p.memory_limit:.1f}%)"),
                 ("largest context that fits", f"{p.largest_context():,} tokens")]
    width = max(len(k) for k, _ in rows)
    head = (f"Memory plan for {title}: batch {p.batch}, context {p.context:,}, activations "
            f"{str(p.act_dtype).split('.')[-1]}, MLA cache {str(p.mla_cache_dtype).split('.')[-1]}, "
            f"KDA state {str(p.kda_state_dtype).split('.')[-1]}")
    return "\n".join([head] + [f"{k:<{width}}  {v:>22}" for k, v in rows])
