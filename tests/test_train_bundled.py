"""tools/train_bundled.py: a few steps of the real training loop at a tiny size on CPU lower the loss, balance the
experts, and write a checkpoint klconvert loads."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import train_bundled  # noqa: E402

from klconvert.checkpoint.reader import Checkpoint  # noqa: E402
from klconvert.runtime.engine import load  # noqa: E402
from klconvert.release import layer_lists  # noqa: E402

# The bundled config cut down: 4 layers (KDA x3, MLA), hidden 128, 4 experts; the bundled vocabulary.
TINY = {**copy.deepcopy(train_bundled.BUNDLED_CONFIG), "hidden_size": 128, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_experts": 4, "kv_lora_rank": 32, "num_attention_heads": 2,
        "num_key_value_heads": 2, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "moe_intermediate_size": 64,
        "linear_attn_config": {**layer_lists(4), "head_dim": 16, "num_heads": 2, "short_conv_kernel_size": 4}}


def test_training_lowers_the_loss_and_writes_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    lines = []
    log = train_bundled.train(tmp_path / "out", config=TINY, steps=12, batch=4, seq_len=32, lr=1e-2, eval_every=4,
                              validation_tokens=512, max_chars=100_000, device="cpu", plot=False,
                              bias_rate=1e-2, log=lines.append)
    assert log["steps_run"] == 12 and len(log["validation_loss"]) == 3
    assert log["train_loss"][-1] < log["train_loss"][0] - 0.5, log["train_loss"]
    assert log["validation_loss"][-1] < log["validation_loss"][0], log["validation_loss"]
    assert log["kept_step"] == log["validation_step"][log["validation_loss"].index(min(log["validation_loss"]))]
    assert set(log["expert_load_validation"]) == {"1", "2", "3"}   # the MoE layers
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "loss.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
                     "tiktoken.model", "tokenizer_config.json"]     # with loss.png, 2 shards at full size: 8 files
    assert json.loads((out / "loss.json").read_text())["kept_step"] == log["kept_step"]
    ckpt = Checkpoint(out)
    bias = ckpt.get("model.layers.1.block_sparse_moe.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0       # balancing moved the correction biases
    engine = load(out, device="cpu", max_context=64, kernels="torch")
    logits = engine.forward(torch.tensor([[5, 6, 7, 8]]))
    assert logits.shape == (1, 4, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_balancing_moves_biases_toward_the_even_load():
    c = train_bundled.KimiLinearConfig.from_dict(TINY)
    model = train_bundled.fresh_model(c, torch.device("cpu"), seed=0)
    counts = {layer: torch.tensor([10.0, 0.0, 5.0, 5.0]) for layer in train_bundled.routers(model)}
    train_bundled.balance(model, counts, rate=0.5)
    bias = model.blocks[1].block_sparse_moe.gate.e_score_correction_bias
    assert bias.tolist() == [-0.5, 0.5, 0.0, 0.0]   # overloaded down, idle up, average untouched
