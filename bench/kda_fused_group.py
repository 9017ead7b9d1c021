"""What each way of storing the KDA input group vLLM fuses (in_proj_qkvgfab: q, k, v, b, f_a) costs: KL and top-1
on a synthetic tiny model calmed as tests/calm_checkpoint.py does, and weight bytes on the released 48B shapes.

Three policies at --bits, all else as the default policy (router, f_b/g_a/g_b, convs kept; lm_head int8 g128):
  split      q/k/v quantized, b_proj and f_a_proj kept (the old default; vLLM refuses it)
  quantized  b_proj and f_a_proj quantized with q/k/v (the default)
  kept       the whole group kept as released (KEEP_WHOLE = ("in_proj_qkvgfab",) in klconvert/quant/defaults.py)

    python bench/kda_fused_group.py --text-file README.md --bits 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from calm_checkpoint import calm_copy  # noqa: E402

from klconvert.checkpoint.folder_files import CONFIG_FILE  # noqa: E402
from klconvert.checkpoint.name_map import expected_tensors  # noqa: E402
from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.evaluate import evaluate  # noqa: E402
from klconvert.quant import Entry, Recipe, policy_from_options  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402
from klconvert.runtime.plan_report import plan_for  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.synth.checkpoint import synth  # noqa: E402

B_AND_F_A = Entry(r"re:.*\.(f_a|b)_proj$", "bench: split")


def policies(bits: int):
    default = policy_from_options(bits)
    return {"split": replace(default, ignore=(*default.ignore, B_AND_F_A)), "quantized": default,
            "kept": replace(default, keep_fused=("in_proj_qkvgfab",))}


def recipe_file(policy, checkpoint: Path, path: Path) -> Path:
    """The policy checked against the checkpoint, written as the recipe `quantize --recipe` applies."""
    config = KimiLinearConfig.from_file(checkpoint / CONFIG_FILE)
    path.write_text(policy.check_against((n, s.shape) for n, s in expected_tensors(config).items()).to_recipe_yaml())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--text-file", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    text = args.text_file.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calm = calm_copy(synth("tiny", root / "tiny", seed=1, progress=False).path, root / "calm")
        print("| policy | KL mean | KL p99 | top-1 | 48B weights |")
        print("|---|---|---|---|---|")
        for name, policy in policies(args.bits).items():
            recipe = recipe_file(policy, calm, root / f"{name}.yaml")
            out = quantize(calm, root / name, recipe=recipe, device="cpu", progress=False, allow_split_fused=True).path
            r = evaluate(out, calm, text, max_tokens=args.max_tokens, device="cpu", dtype="float32")
            plan = plan_for(preset="kimi-linear-48b", recipe=Recipe(policy=policy))
            print(f"| {name} | {r.kl_mean:.5f} | {r.kl_p99:.5f} | {r.top1_agreement:.2%} | "
                  f"{sum(plan.weight_bytes.values()) / 2**30:.3f} GiB |", flush=True)


if __name__ == "__main__":
    main()
