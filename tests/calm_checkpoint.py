"""calm_copy: a synthetic checkpoint made to behave like a trained one, so logit errors measure what is tested."""
from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

RESIDUAL_OUTPUTS = ("o_proj.weight", "w2.weight", "down_proj.weight")  # what each layer adds to the residual


def calm_copy(src, dst):
    """A copy of a synthetic checkpoint made to behave like a trained model under small weight noise.

    As synthesized, its routers have near ties (one bf16 ulp in a layer-0 q_proj flips an expert choice of a
    later token and moves the logits by 35%) and every layer adds as much as the residual it reads. Here the
    correction bias pins each layer's four experts with a wide margin, and the residual-branch outputs are
    scaled by 1/4, so logit errors measure quantization or kernels rather than chaos.
    """
    folder = shutil.copytree(src, dst)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("e_score_correction_bias"):
                layer = int(name.split(".")[2])
                tensors[name] = torch.zeros_like(t).index_fill_(0, (torch.arange(4) + 4 * layer) % t.numel(), 10.0)
            elif name.endswith(RESIDUAL_OUTPUTS):
                tensors[name] = (t.float() / 4).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder
