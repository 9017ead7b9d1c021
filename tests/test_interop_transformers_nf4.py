"""Where transformers loads an nf4 folder (README, Interop): its bitsandbytes quantizer turns each nn.Linear into a
Linear4bit, but KimiLinear's routed experts are 3-D parameters (KimiLinearExperts), which it never converts -- so the
default nf4 folder, whose experts are NF4, fails to load, and one whose recipe keeps the routed experts as they are
loads with every other NF4 weight as we store it."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from packaging.version import Version

import klconvert
from klconvert.checkpoint.name_map import canonical_pieces
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.quant import policy_from_options
from klconvert.quant.policy import Entry, converted_module, is_linear_weight, kept_in_high_precision
from klconvert.quantize import quantize
from testkit import TRANSFORMERS_ON_THE_CPU, run_cli

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes", reason="the [nf4] extra is not installed")
pytest.importorskip("accelerate", reason="transformers loads a bitsandbytes folder only with accelerate installed")
from bitsandbytes.functional import dequantize_4bit  # noqa: E402

# Both names of each routed expert's projections, as the recipe must select them (vLLM's fused-module check)
ROUTED_EXPERTS = r"re:.*\.experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)$"
IDS = torch.arange(1, 49).view(1, 48)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ours(folder) -> torch.Tensor:
    return klconvert.load(folder, device="cpu", dtype=torch.float32, max_context=64).forward(IDS)


def transformers_model(folder, **options):
    # bfloat16: the dtype bitsandbytes computes in (quantization_config's bnb_4bit_compute_dtype), and the release's too
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **options).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes 0.50's AVX512-bf16 CPU path repacks a weight in blocks of 32 rows and asserts on a row
            # count that is no multiple of 32, as the tiny b_proj's (one a head; the released one has 32); its plain
            # dequantizing path computes the same product
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def nf4_folders(trained_like, tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4")
    names = [(n, s.shape) for n, s in open_checkpoint(trained_like).expected.items()]
    policy = policy_from_options(scheme="nf4")
    kept = replace(policy, ignore=(*policy.ignore, Entry(ROUTED_EXPERTS))).check_against(names)
    (root / "experts-kept.yaml").write_text(kept.to_recipe_yaml())
    return {"default": quantize(trained_like, root / "default", scheme="nf4", device="cpu", progress=False).path,
            "experts kept": quantize(trained_like, root / "kept", recipe=root / "experts-kept.yaml", device="cpu",
                                     progress=False).path}


@TRANSFORMERS_ON_THE_CPU
def test_transformers_cannot_load_nf4_routed_experts(nf4_folders):
    """The stacked NF4 bytes ([experts, n/2, 1]) do not fit the float stack transformers builds ([experts, out, in]):
    from 5.23 the load is refused, and told to ignore that, it leaves the experts as the floats it initialized them
    to, none of ours. 5.17-5.22 (which [test] admits) take the packed bytes as the stack itself, a uint8 parameter,
    and fail in the forward (h293: this test asserted 5.23's behaviour alone, and failed there)."""
    folder = nf4_folders["default"]
    ckpt, stack = open_checkpoint(folder), "model.layers.1.mlp.experts.down_proj"
    if Version(transformers.__version__) < Version("5.23"):
        model = transformers_model(folder)
        assert model.get_parameter(stack).dtype == torch.uint8
        with pytest.raises((AssertionError, RuntimeError)), torch.no_grad():
            model(IDS)
        return
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers_model(folder)
    model = transformers_model(folder, ignore_mismatched_sizes=True)
    experts = model.get_parameter(stack)
    assert experts.is_floating_point() and experts.dim() == 3
    for canonical, index in canonical_pieces(stack, ckpt.config):
        assert rel_err(experts[index], ckpt.get(canonical)) > 0.5, canonical


@pytest.mark.slow
@TRANSFORMERS_ON_THE_CPU
def test_transformers_loads_nf4_with_the_routed_experts_kept(nf4_folders, trained_like):
    """Every NF4 weight we store becomes a Linear4bit that dequantizes to what klconvert reads, bit for bit; every
    other weight transformers holds (the routed experts among them) equals ours rounded to its dtype (bf16 as asked:
    A_log and dt_bias are stored fp32); its
    logits (bf16 compute) are within 2% of ours in fp32, under half the quantization error."""
    folder = nf4_folders["experts kept"]
    model, ckpt, compared = transformers_model(folder), open_checkpoint(folder), set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            (canonical, _), = canonical_pieces(f"{name}.weight", ckpt.config)
            want = ckpt.get(canonical)
            assert torch.equal(dequantize_4bit(module.weight.data, module.weight.quant_state).to(want.dtype), want)
            compared.add(canonical)
    assert len(compared) == 68   # every linear outside the skip list and the routed experts, in the tiny model's 8
    for name, t in model.state_dict().items():
        for canonical, index in canonical_pieces(name, ckpt.config):
            if canonical in ckpt.expected and canonical not in compared:
                want = ckpt.get(canonical)
                assert torch.equal(t[index] if index else t, want.to(t.dtype)), canonical
                compared.add(canonical)
    assert compared == set(ckpt.expected), sorted(set(ckpt.expected) - compared)[:8]
    with torch.no_grad():
        got = model(IDS).logits
    want = ours(folder)
    err, quant_err = rel_err(got, want), rel_err(want, ours(trained_like))
    assert err < 2e-2 and err < quant_err / 2, (err, quant_err)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


# transformers' own bitsandbytes NF4 (its quick start's config): what from_pretrained and save_pretrained give a user
TRANSFORMERS_NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": torch.bfloat16}
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json")
ROUTED_W2 = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
SHARED_GATE = "model.layers.1.block_sparse_moe.shared_experts.gate_proj.weight"


def saved_by_transformers(src, out, **options):
    """`src` quantized to NF4 by transformers itself and saved as it saves it, with `src`'s tokenizer beside it."""
    config = transformers.BitsAndBytesConfig(**TRANSFORMERS_NF4, **options)
    transformers_model(src, quantization_config=config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    return out


@TRANSFORMERS_ON_THE_CPU
@pytest.mark.parametrize("skip_modules", [None, ["lm_head", "model.layers.1.mlp.shared_experts",
                                                 r".*\.forget_gate\.f_a_proj"]],
                         ids=["transformers-default", "skips-by-in-memory-names"])
def test_an_nf4_folder_transformers_writes_runs(trained_like, tmp_path, capsys, skip_modules):
    """transformers never converts the routed experts (3-D parameters, no nn.Linear) and saves them as floats under a
    skip list that does not list them; it matches the list against its in-memory names (mlp.shared_experts,
    self_attn.forget_gate.f_a_proj), not the released ones it saves under. Both folders were refused as floats that
    quantization_config declares 4-bit; they run, each weight read as transformers stored it."""
    folder = saved_by_transformers(trained_like, tmp_path / "nf4", llm_int8_skip_modules=skip_modules)
    ckpt, src = open_checkpoint(folder), open_checkpoint(trained_like)
    kept = [ROUTED_W2] + ([SHARED_GATE, "model.layers.0.self_attn.f_a_proj.weight"] if skip_modules else [])
    for name in kept:
        assert not isinstance(ckpt.sources[name], QuantizedSource), name
        assert torch.equal(ckpt.get(name), src.get(name).to(torch.bfloat16)), name
    assert isinstance(ckpt.sources[SHARED_GATE], QuantizedSource) == (skip_modules is None)
    assert torch.isfinite(ours(folder)).all()
    code, out, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2", "--device",
                             "cpu")
    assert code == 0 and out, err


def test_converted_modules_are_the_linears_transformers_builds(tiny_released):
    """converted_module names, for each released linear weight but the routed experts', a module transformers builds as
    an nn.Linear (its in-memory name, which llm_int8_skip_modules is matched against), and every one it builds."""
    config = transformers.AutoConfig.from_pretrained(tiny_released)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    ckpt = open_checkpoint(tiny_released)
    converted = {converted_module(name) for name, spec in ckpt.expected.items()
                 if is_linear_weight(name, spec.shape) and kept_in_high_precision(name) is None}
    assert converted - {None} == linears


@TRANSFORMERS_ON_THE_CPU
def test_an_nf4_folder_keeping_modules_by_released_names_loads_in_transformers(trained_like, tmp_path, capsys):
    """A recipe keeping the shared experts by their released names (block_sparse_moe.shared_experts) wrote that list
    as llm_int8_skip_modules, which transformers matches against its in-memory names (mlp.shared_experts): it built
    Linear4bits holding the float weights and failed in forward ("FP4 quantization state not initialized"). The list
    now names them as transformers does too, and they load as float Linears equal to ours."""
    names = [(n, s.shape) for n, s in open_checkpoint(trained_like).expected.items()]
    policy = policy_from_options(scheme="nf4")
    kept = replace(policy, ignore=(*policy.ignore, Entry(ROUTED_EXPERTS),
                                   Entry(r"re:.*\.block_sparse_moe\.shared_experts\..*"))).check_against(names)
    (tmp_path / "recipe.yaml").write_text(kept.to_recipe_yaml())
    folder = quantize(trained_like, tmp_path / "nf4", recipe=tmp_path / "recipe.yaml", device="cpu",
                      progress=False).path
    model = transformers_model(folder)
    shared = model.get_submodule("model.layers.1.mlp.shared_experts.gate_proj")
    assert type(shared) is torch.nn.Linear
    assert torch.equal(shared.weight, open_checkpoint(folder).get(SHARED_GATE).to(shared.weight.dtype))
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    code, out, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2", "--device",
                             "cpu")
    assert code == 0 and out, err
