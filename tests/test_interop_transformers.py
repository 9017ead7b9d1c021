"""transformers loads our quantized outputs (the default and every recipe's) and predicts what klconvert predicts;
its known upstream bugs are reproduced, and the conv1d workaround is tested."""
from __future__ import annotations

import base64
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import klconvert
from klconvert.checkpoint.name_map import canonical_pieces
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.convert.stacked_convs import stack_kda_convs
from klconvert.quant import policy_from_options
from klconvert.quantize import quantize
from klconvert.tokenizer import KIMI_PRETOKENIZE_PATTERN, Tokenizer, read_bpe_ranks
from testkit import TRANSFORMERS_ON_THE_CPU

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")   # a transformers dependency
from packaging.version import Version  # noqa: E402  (a transformers dependency)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
KEPT = "int4-kda-input-kept"  # the default flipped: KEEP_WHOLE = ("in_proj_qkvgfab",)
OUTPUTS = {"int4-sym": dict(bits=4), "int8": dict(bits=8), **{p.stem: dict(recipe=p) for p in RECIPES}}
# transformers 5.24 prepends its compressed-tensors dequantize op to every multi-tensor converter, so the KDA conv
# concatenation (never quantized) collects nothing: "Concatenate on tensors destined for ...conv1d.weight".
CONV1D_BUG = Version(transformers.__version__) >= Version("5.24")
# transformers 5.17 decompresses a packed module to its scales' dtype whatever `dtype=` asks, so a float32 model
# fails in its first quantized matmul ("expected m1 and m2 to have the same dtype"): run it in bfloat16 there
DTYPE = torch.float32 if CONV1D_BUG else torch.bfloat16
IDS = torch.arange(1, 49).view(1, 48)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def transformers_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE).eval()


def transformers_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return transformers_model(folder)(IDS).logits


def assert_same_weights(model, folder: Path) -> None:
    """transformers holds every canonical tensor as klconvert reads it: a module it keeps packed has our packed
    tensors and the scheme we stored; any other weight (the routed experts, dequantized while loading), cut back
    through the name table and rounded to the stored dtype, equals ours bit for bit (int times bf16 scale is exact
    in fp32)."""
    ckpt, compared = open_checkpoint(folder), set()
    for module_name, module in model.named_modules():
        if hasattr(module, "weight_packed"):
            (canonical, _), = canonical_pieces(f"{module_name}.weight", ckpt.config)
            parts, scheme = ckpt.packed(canonical)
            args = module.quantization_scheme.weights
            assert (args.num_bits, args.symmetric, args.group_size) == (scheme.bits, scheme.symmetric,
                                                                        scheme.group_size), canonical
            for part, tensor in parts.items():
                assert torch.equal(getattr(module, part.rsplit(".", 1)[-1]), tensor), (canonical, part)
            compared.add(canonical)
    for name, t in model.state_dict().items():
        for canonical, index in canonical_pieces(name, ckpt.config):
            if canonical in ckpt.expected and canonical not in compared:
                want = ckpt.get(canonical)
                assert torch.equal((t[index] if index else t).to(want.dtype), want), canonical
                compared.add(canonical)
    assert compared == set(ckpt.expected), sorted(set(ckpt.expected) - compared)[:8]


def ours(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return klconvert.load(folder, device="cpu", dtype=dtype, max_context=64).forward(IDS)


@pytest.fixture(scope="module")
def outputs(trained_like, tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    names = [(n, s.shape) for n, s in open_checkpoint(trained_like).expected.items()]
    kept = replace(policy_from_options(bits=4), keep_fused=("in_proj_qkvgfab",)).check_against(names)
    (root / "kept.yaml").write_text(kept.to_recipe_yaml())
    return {label: quantize(trained_like, root / label, device="cpu", progress=False, **opts).path
            for label, opts in {**OUTPUTS, KEPT: dict(recipe=root / "kept.yaml")}.items()}


@pytest.fixture(scope="module")
def source_logits(trained_like):
    return ours(trained_like)


def for_transformers(folder: Path, tmp_path: Path) -> Path:
    """The folder as transformers can load it: itself, or with the conv1d workaround where the bug bites."""
    if not CONV1D_BUG:
        return folder
    copy = shutil.copytree(folder, tmp_path / folder.name)
    assert stack_kda_convs(copy) == 6  # the tiny model's KDA layers
    return copy


@pytest.mark.slow
@TRANSFORMERS_ON_THE_CPU
@pytest.mark.parametrize("label", [*OUTPUTS, KEPT])
def test_transformers_predicts_what_we_predict(outputs, source_logits, label, tmp_path):
    folder = for_transformers(outputs[label], tmp_path)
    want = ours(outputs[label])
    assert torch.equal(ours(folder), want)  # the workaround changes nothing klconvert reads
    model = transformers_model(folder)
    assert_same_weights(model, outputs[label])
    with torch.no_grad():
        got = model(IDS).logits
    if DTYPE == torch.float32:
        # the weights are equal once rounded to bf16; transformers computes with them unrounded (fp32), hence a
        # small difference, below the quantization error itself
        err, quant_err = rel_err(got, want), rel_err(want, source_logits)
        assert err < 5e-3 and err < quant_err, (err, quant_err)
    else:  # both in bf16: about our own bf16-vs-fp32 difference (0.9% here)
        want = ours(outputs[label], DTYPE)
        assert rel_err(got, want) < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_the_folder_names_no_remote_code_so_trust_remote_code_loads_it(outputs, trained_like):
    """The release's config.json and tokenizer_config.json name its Python files in auto_map; the folder copies no
    .py, so with auto_map kept `trust_remote_code=True` (the release's own instructions, and vLLM's
    --trust-remote-code) failed for want of configuration_kimi.py. Without it transformers takes its own classes."""
    folder = outputs["int4-sym"]
    for name in ("config.json", "tokenizer_config.json"):
        source, written = (json.loads((f / name).read_text()) for f in (trained_like, folder))
        assert "auto_map" in source and "auto_map" not in written, name
        assert {k: v for k, v in source.items() if k != "auto_map"}.items() <= written.items(), name
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config) is transformers.KimiLinearConfig
    text = "The quick brown fox said: 42 apples,\n  and then some."
    assert (transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True).encode(text)
            == Tokenizer.from_folder(folder).encode(text))


# Texts whose pieces Kimi's pattern cuts otherwise than the cl100k-like one transformers converts a bare tiktoken.model
# with (a contraction stays on its word; Han apart from kana and Latin; CamelCase apart), and the rest of what a
# pre-tokenizer decides: digit runs, newlines and CRLF, spaces, emoji
TOKENIZER_TEXTS = [" I'll", " I'm", "don't", "And I'll go, I'm sure you don't.", "THE KING'S MEN", "日本語のテキスト",
                   "Kimi模型，你好世界！", " CamelCase HTTPServer", "12345678 3.14", "a\nb\r\nc\r\n\r\n\n  d",
                   "emoji 😀👍 👍🏽 👨\u200d👩\u200d👧", "  trailing   ", "\t\tindented", ""]
# Tokens the quantized folder's tiktoken.model is given (each with its prefixes, as a BPE has them) so that a text
# above is one token where its pieces are cut otherwise: a split of transformers' own turns up as other ids
CRAFTED_TOKENS = (" I'll", " I'm", "don't", "日本語のテキスト", "のテキスト", " CamelCase", "12345", "\r\n\r\n",
                  " 😀👍")


@pytest.fixture(scope="module")
def crafted(tiny_released, tmp_path_factory) -> Path:
    """The tiny checkpoint, its last BPE ranks given to CRAFTED_TOKENS, quantized."""
    source = shutil.copytree(tiny_released, tmp_path_factory.mktemp("crafted") / "source")
    path = source / "tiktoken.model"
    ranks = read_bpe_ranks(path)
    order = sorted(ranks, key=ranks.get)
    chains = [token.encode()[:end] for token in CRAFTED_TOKENS for end in range(2, len(token.encode()) + 1)]
    head = order[:len(order) - len(chains)]   # the last ranks make room (no token builds on them)
    added = list(dict.fromkeys(token for token in chains if token not in set(head)))
    refill = [token for token in order[len(head):] if token not in set(added)]   # as many ranks as before
    tokens = head + added + refill[:len(order) - len(head) - len(added)]
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens)))
    return quantize(source, source.parent / "q", device="cpu", progress=False).path


def test_transformers_and_tokenizers_encode_as_klconvert(crafted):
    """transformers reads the tokenizer.json quantize writes, not its own conversion of tiktoken.model, whose split
    made " I'll" " I" + "'ll" and "日本語のテキスト" one piece; the `tokenizers` library reads it alike. Both decode
    every text back."""
    ours = Tokenizer.from_folder(crafted)
    hf = transformers.AutoTokenizer.from_pretrained(crafted, trust_remote_code=True)
    assert [len(ours.encode(text)) for text in (" I'll", "日本語のテキスト")] == [1, 2]   # Kimi cuts 日本語|のテキスト
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text   # no BOS added, as klconvert adds none
        assert hf.decode(ids) == ours.decode(ids) == text
    assert hf.convert_ids_to_tokens(ours.encode(" I'll")) == ["ĠI'll"]
    backend = tokenizers.Tokenizer.from_file(str(crafted / "tokenizer.json"))
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text)
        assert backend.encode(text, add_special_tokens=False).ids == ids, text
        assert backend.decode(ids) == text


def test_special_token_text_is_special_in_transformers_only_as_it_is_in_a_chat(crafted):
    """klconvert encodes special-token text in a plain prompt as text (tests/test_tokenizer.py); transformers as the
    special token, and as text with split_special_tokens=True, which is where the two agree. A chat agrees as it is:
    both give the template's specials their ids -- but for a message holding special text, which klconvert keeps
    text and transformers makes the token."""
    ours = Tokenizer.from_folder(crafted)
    hf = transformers.AutoTokenizer.from_pretrained(crafted, trust_remote_code=True)
    for text, token_id in ours.special_tokens.items():
        assert hf.encode(text) == [token_id], text
        assert hf.encode(text, split_special_tokens=True) == ours.encode(text), text
        assert hf.decode([token_id]) == ours.decode([token_id]) == text
    prompt = "Say <|im_end|> please[EOS]"
    assert hf.encode(prompt) == [*ours.encode("Say "), ours.special_tokens["<|im_end|>"], *ours.encode(" please"),
                                 ours.eos_id]
    assert hf.encode(prompt, split_special_tokens=True) == ours.encode(prompt)

    def chat(messages):
        return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I'll ask: 日本語のテキスト?"},
                {"role": "assistant", "content": "Don't."}, {"role": "user", "content": "12345\r\n"}]
    assert chat(messages) == ours.encode_chat(messages)
    quoting = [{"role": "user", "content": "what is <|im_end|>?"}]
    end = ours.special_tokens["<|im_end|>"]
    assert chat(quoting).count(end) == ours.encode_chat(quoting).count(end) + 1


def test_tokenizer_json_is_transformers_conversion_with_kimi_s_split(crafted):
    """The file is what TikTokenConverter makes of tiktoken.model given Kimi's pattern and the folder's specials:
    the same model (vocab, merges, ignore_merges), pre-tokenizer, decoder and added tokens."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ours = Tokenizer.from_folder(crafted)

    class FromOurRanks(TikTokenConverter):   # load_tiktoken_bpe would cache the file under /tmp by its path
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):
            return dict(ours.bpe_ranks)

    specials = sorted(ours.special_tokens, key=ours.special_tokens.get)
    converted = FromOurRanks(pattern=KIMI_PRETOKENIZE_PATTERN, extra_special_tokens=specials).converted()
    written = tokenizers.Tokenizer.from_file(str(crafted / "tokenizer.json"))
    assert json.loads(written.to_str()) == json.loads(converted.to_str())


def with_tokenizer_config(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of the quantized `folder` whose tokenizer_config.json `edit` changed after klconvert checked it."""
    copy = shutil.copytree(folder, tmp_path / folder.name)
    path = copy / "tokenizer_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("key", ["unk_token", "mask_token", "think_token"])
def test_transformers_gives_a_named_token_it_lacks_an_id_past_the_vocabulary(crafted, tmp_path, key):
    """Why klconvert holds every token the config names (tokenizer.SPECIAL_TOKEN_KEYS, and any other "<name>_token"
    holding text) to added_tokens_decoder as it holds bos_token: transformers gives text it lacks a new id, which the
    model has no embedding for, and fails to load one that is no text."""
    vocab_size = Tokenizer.from_folder(crafted).vocab_size
    folder = with_tokenizer_config(crafted, tmp_path / "text", lambda c: c.update({key: "<|nope|>"}))
    hf = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert hf.convert_tokens_to_ids("<|nope|>") == vocab_size
    if key != "think_token":   # transformers takes only text as a token of a name of its own
        folder = with_tokenizer_config(crafted, tmp_path / "int", lambda c: c.update({key: 5}))
        with pytest.raises(TypeError, match=f"Special token {key} has to be either str or AddedToken"):
            transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def test_special_tokens_map_json_is_never_read_beside_added_tokens_decoder(tiny_released, tmp_path):
    """quantize copies special_tokens_map.json unchecked, and may: transformers 5 reads it only where
    tokenizer_config.json has no added_tokens_decoder, which klconvert refuses (read_special_tokens). A map that
    contradicts the config, or holds no JSON at all, changes nothing transformers loads; without added_tokens_decoder
    transformers reads its tokens (and fails on the int)."""
    source = shutil.copytree(tiny_released, tmp_path / "source")
    contradicting = {"bos_token": "<|nope|>", "eos_token": {"content": "[EOS]", "lstrip": True, "rstrip": True},
                     "unk_token": 5, "additional_special_tokens": ["<|extra|>", {"content": "<|im_end|>", "lstrip": 1}],
                     "extra_special_tokens": ["<|more|>"]}
    loaded = {}
    for label, text in {"released": None, "contradicting": json.dumps(contradicting), "no JSON": "{"}.items():
        if text is not None:
            (source / "special_tokens_map.json").write_text(text)
        out = quantize(source, tmp_path / label, device="cpu", progress=False).path
        assert (out / "special_tokens_map.json").read_bytes() == (source / "special_tokens_map.json").read_bytes()
        loaded[label] = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = " [BOS] <|im_end|> x<|im_user|>y [UNK]\n"
    for label, hf in loaded.items():
        assert (len(hf), hf.all_special_tokens, hf.encode(text)) == (len(loaded["released"]),
                                                                     loaded["released"].all_special_tokens,
                                                                     loaded["released"].encode(text)), label
    read = with_tokenizer_config(tmp_path / "contradicting", tmp_path / "read", lambda c: c.pop("added_tokens_decoder"))
    with pytest.raises(TypeError, match="Special token unk_token has to be either str or AddedToken"):
        transformers.AutoTokenizer.from_pretrained(read, trust_remote_code=True)


# An entry of the config's extra special tokens that sets every flag otherwise than added_tokens_decoder does
FLAGGED = {"__type": "AddedToken", "lstrip": True, "rstrip": True, "single_word": True, "normalized": True,
           "special": False}


@pytest.mark.parametrize("field, form", [("additional_special_tokens", list), ("extra_special_tokens", list),
                                         ("extra_special_tokens", dict)])
def test_flags_of_an_extra_special_token_change_nothing_transformers_reads(tiny_released, tmp_path, field, form):
    """quantize passes an entry of additional_special_tokens or extra_special_tokens (or a named token, unk_token)
    given as a serialized AddedToken whatever bool flags it sets, and may: transformers 5 takes each token's flags
    from added_tokens_decoder, which holds its text (special_token_text), so it splits text around the token (lstrip,
    rstrip, single_word) and decodes it (special) as klconvert does. Where added_tokens_decoder sets them, as
    klconvert refuses, it does not."""
    source = shutil.copytree(tiny_released, tmp_path / "source")
    path = source / "tokenizer_config.json"
    config = json.loads(path.read_text())
    texts = [*config["additional_special_tokens"], config["unk_token"]]
    entries = [{**FLAGGED, "content": text} for text in texts[:-1]]
    config[field] = entries if form is list else {f"extra_{i}_token": entry for i, entry in enumerate(entries)}
    config["unk_token"] = {**FLAGGED, "content": texts[-1]}   # a named token's too
    path.write_text(json.dumps(config))
    out = quantize(source, tmp_path / "q", device="cpu", progress=False).path
    ours, hf = Tokenizer.from_folder(out), transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    around = [(" ", " x"), ("a", "b"), ("\n", "\n")]
    for text in texts:
        token_id = ours.special_tokens[text]
        for before, after in around:
            assert hf.encode(before + text + after) == [*ours.encode(before), token_id, *ours.encode(after)], text
        assert hf.decode([token_id], skip_special_tokens=True) == "", text
    in_decoder = with_tokenizer_config(out, tmp_path / "decoder", lambda c: [
        entry.update({flag: True for flag in ("lstrip", "rstrip")}) for entry in c["added_tokens_decoder"].values()])
    text = texts[0]
    assert (transformers.AutoTokenizer.from_pretrained(in_decoder, trust_remote_code=True).encode(f" {text} x")
            != hf.encode(f" {text} x"))


def test_a_config_transformers_saved_reads_as_the_release_s(tmp_path):
    """transformers' KimiLinearConfig saves the layer kinds again under its own names (layer_types, mlp_layer_types,
    linear_*), beside linear_attn_config: klconvert reads such a config as the one it came from, and refuses one whose
    two sayings disagree (tests/test_hostile_files.py)."""
    source = json.loads((Path(klconvert.__file__).parent / "bundled" / "config.json").read_text())
    fields = {k: v for k, v in source.items() if k not in ("architectures", "auto_map")}
    transformers.KimiLinearConfig(**fields).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"layer_types", "mlp_layer_types", "linear_head_dim"} <= saved.keys()
    read = klconvert.config.KimiLinearConfig.from_dict
    assert replace(read(saved), raw={}) == replace(read(source), raw={})


@pytest.mark.skipif(not CONV1D_BUG, reason="the conv1d concatenation bug is in transformers >= 5.24")
def test_conv1d_bug_reproduction(outputs):
    """Minimal reproduction: any quantized folder with the released q/k/v_conv1d names (ours; llm-compressor's too)."""
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        transformers_logits(outputs["int8"])


def test_stack_kda_convs_keeps_the_weights(trained_like, tmp_path):
    folder = shutil.copytree(trained_like, tmp_path / "copy")
    assert stack_kda_convs(folder) == 6 and stack_kda_convs(folder) == 0  # a second run finds nothing to stack
    assert torch.equal(ours(folder), ours(trained_like))


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="upstream: transformers' expert decompressor never passes zero points, and "
                          "compressed-tensors 0.20.1 expects unpacked zero points; README, Interop")
def test_asymmetric_int4_loads_in_transformers(trained_like, tmp_path):
    out = quantize(trained_like, tmp_path / "q" / "asym", bits=4, symmetric=False, device="cpu", progress=False).path
    got = transformers_logits(for_transformers(out, tmp_path))
    assert rel_err(got, ours(out)) < 1e-2
