"""The `klconvert` command: one verb per subcommand, each parsing its flags and calling one library function."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from klconvert.errors import KLError
from klconvert.hub import DEFAULT_REPO
from klconvert.models import BUNDLED_NAME, DEFAULT_MODEL_DIR, default_run_model, resolve_model
from klconvert.runtime.plan_report import parse_size


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="klconvert")
def cli() -> None:
    """Pull, quantize and run Moonshot AI's Kimi Linear on one GPU."""


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "kimi-linear-48b"]), required=True,
              help="tiny: a few-MB model of the same structure; kimi-linear-48b: the released shapes.")
@click.option("--layers", type=int, default=None, help="Keep only N layers (3:1 KDA:MLA pattern kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--layout", type=click.Choice(["released", "transformers"]), default="released", show_default=True,
              help="Tensor layout: the released checkpoint's, or the native transformers port's.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to create.")
def synth(preset: str, layers: int | None, seed: int, layout: str, out: Path) -> None:
    """Write a random-weight checkpoint in exactly the released format."""
    from klconvert.synth.checkpoint import synth as write_synth

    result = write_synth(preset, out, layers=layers, seed=seed, layout=layout)
    click.echo(f"wrote {result.path}: {result.tensors} tensors, {result.bytes / 1e9:.3f} GB in {result.shards} "
               "shard(s)", err=True)


@cli.command()
@click.argument("repo", default=DEFAULT_REPO)
@click.option("--revision", default=None, help="Branch, tag or commit [default: main].")
@click.option("--include", multiple=True, help="Only files matching this pattern (repeatable).")
@click.option("--exclude", multiple=True, help="Skip files matching this pattern (repeatable).")
@click.option("--local-dir", type=click.Path(path_type=Path), default=None, help="Download into this folder.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Hugging Face cache to use [default: $HF_HOME/hub].")
def pull(repo: str, revision: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
         local_dir: Path | None, cache_dir: Path | None) -> None:
    """Download a repo's safetensors, configs and tokenizer (never pickles or code) and verify every file."""
    from klconvert.hub import pull as hub_pull

    if local_dir is not None and cache_dir is not None:
        raise KLError("give at most one of --local-dir and --cache-dir")
    result = hub_pull(repo, revision=revision, include=list(include) or None, exclude=list(exclude) or None,
                      local_dir=local_dir, cache_dir=cache_dir)
    click.echo(f"{repo}@{result.commit}: {len(result.files)} files verified, "
               f"{result.bytes_downloaded / 1e9:.2f} GB downloaded", err=True)
    click.echo(str(result.path))


def _read_prompt(prompt_file: str) -> str:
    try:
        data = sys.stdin.buffer.read() if prompt_file == "-" else Path(prompt_file).read_bytes()
    except OSError as e:
        raise KLError(f"--prompt-file {prompt_file}: cannot read it ({e.strerror}); check the path") from None
    where = "standard input" if prompt_file == "-" else prompt_file
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KLError(f"--prompt-file {where}: not UTF-8 text (bad byte at offset {e.start}); convert it to "
                      "UTF-8") from None
    if not text.strip():
        raise KLError(f"--prompt-file {where}: the prompt is empty; write some text into it")
    return text


@cli.command()
@click.option("--model", default=None,
              help=f"Checkpoint folder (released, transformers or quantized layout), or {BUNDLED_NAME} for the bundled "
                   f"model [default: {DEFAULT_MODEL_DIR} when it exists, else {BUNDLED_NAME}].")
@click.option("--prompt-file", required=True, help="UTF-8 text file with the prompt, or - for standard input.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user turn with the model's chat template.")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Context the memory plan holds [default: prompt + max-new-tokens].")
@click.option("--device", default=None, help="cpu or cuda [default: cuda if present].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help="Compute dtype [default: bfloat16 on cuda, float32 on cpu].")
@click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="Triton kernels (int weights, fused KDA step, fused MoE) or the PyTorch reference; auto: "
                   "Triton on cuda.")
def run(model: str | None, prompt_file: str, max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
        chat: bool, max_context: int | None, device: str | None, dtype: str | None, kernels: str) -> None:
    """Continue a prompt: the text streams to stdout, a summary goes to stderr."""
    from klconvert.runtime.engine import load
    from klconvert.tokenizer import StreamDecoder, Tokenizer

    text = _read_prompt(prompt_file)
    if model is None:
        model, which = default_run_model()
        click.echo(f"klconvert: {which}", err=True)
    else:
        model = resolve_model(model)
    if not model.is_dir():
        raise KLError(f"--model {model}: no such folder; pass --model DIR, or run `klconvert pull-and-quantize "
                      "--bits 4` first (it writes the default folder)")
    tokenizer = Tokenizer.from_folder(model)
    ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
    context = max_context if max_context is not None else len(ids) + max_new_tokens
    engine = load(model, device=device, dtype=dtype, max_context=context, kernels=kernels)
    engine.check_fits(len(ids), max_new_tokens)
    stream = StreamDecoder(tokenizer)
    stop = tokenizer.stop_ids

    def emit(sequence: int, token: int) -> None:
        if token not in stop:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    engine.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop,
                    on_token=emit)
    sys.stdout.write(stream.flush() + "\n")
    s, plan = engine.stats, engine.plan
    click.echo(f"prompt {s.prompt_tokens} tokens | prefill {s.prefill_tps:.1f} tokens/s | {s.new_tokens} new, "
               f"decode {s.decode_tps:.1f} tokens/s | plan: {engine.device} {str(engine.dtype).split('.')[-1]} "
               f"{'triton' if engine.triton else 'torch'}, "
               f"context {plan.context}, batch {plan.batch}, total {plan.total / 2**30:.2f} GiB", err=True)


@cli.command()
@click.option("--model", default=None, help=f"Checkpoint folder to plan for, or {BUNDLED_NAME} (the bundled model).")
@click.option("--preset", type=click.Choice(["tiny", "kimi-linear-48b"]), default=None,
              help="Plan for a preset instead of a folder.")
@click.option("--layers", type=int, default=None, help="With --preset: keep only N layers.")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="Recipe YAML (recipes/*.yaml): its quantization sizes the weights, its runtime section sets "
                   "the defaults of the flags below.")
@click.option("--gpu-memory", default=None, help="Device memory to fit, e.g. 80GiB, 24GB.")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Planned context [default: the recipe's, else 131072].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Planned batch [default: the recipe's, else 1].")
@click.option("--mla-cache-dtype", type=click.Choice(["bfloat16", "float8_e4m3fn"]), default=None,
              help="MLA latent cache dtype [default: the recipe's, else bfloat16].")
@click.option("--kda-state-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="KDA recurrent state dtype [default: the recipe's, else float32].")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="Without --recipe: weight bits of the quantized layers, lm_head at 8 [default: 16, unquantized].")
@click.option("--group-size", type=click.IntRange(min=1), default=128, show_default=True)
def plan(model: str | None, preset: str | None, layers: int | None, recipe: Path | None, gpu_memory: str | None,
         max_context: int | None, batch: int | None, mla_cache_dtype: str | None, kda_state_dtype: str | None,
         bits: str | None, group_size: int) -> None:
    """Print the memory plan: weights, KDA state, MLA cache, workspace, headroom, largest context."""
    from klconvert.runtime.plan_report import plan_for, render_plan

    if (model is None) == (preset is None):
        raise KLError("give exactly one of --model DIR or --preset NAME")
    model = None if model is None else resolve_model(model)
    p = plan_for(model=model, preset=preset, layers=layers, recipe=recipe, batch=batch, context=max_context,
                 bits=None if bits in (None, "16") else int(bits), group_size=group_size,
                 memory_limit=parse_size(gpu_memory) if gpu_memory else None, mla_cache_dtype=mla_cache_dtype,
                 kda_state_dtype=kda_state_dtype)
    click.echo(render_plan(p, title=str(model or preset) + (f" with {recipe}" if recipe else "")))


def _quantize_options(command):
    """The flags `quantize` and `pull-and-quantize` share, in the order --help lists them."""
    options = [
        click.option("--bits", type=int, default=None,
                     help="Bits of the quantized layers: 4 or 8 [default: 4]; lm_head stays at 8."),
        click.option("--group-size", type=int, default=None,
                     help="Input columns per scale, e.g. 32, 64, 128; -1: one scale per row [default: 128]."),
        click.option("--sym/--asym", "symmetric", default=None,
                     help="Symmetric scales, or asymmetric with zero points [default: --sym]."),
        click.option("--scheme", type=click.Choice(["int", "nf4"]), default=None,
                     help="int: compressed-tensors pack-quantized [default]; nf4: bitsandbytes 4-bit."),
        click.option("--recipe", type=click.Path(path_type=Path), default=None,
                     help="llm-compressor-shaped recipe YAML saying how each tensor is stored (instead of the "
                          "four flags above)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Where to quantize [default: cuda if present]."),
        click.option("--force", is_flag=True,
                     help="Replace an existing output folder (only once the new one is whole) and discard an "
                          "interrupted run made with other options."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@_quantize_options
def quantize(src: str, out: Path, bits: int | None, group_size: int | None, symmetric: bool | None,
             scheme: str | None, recipe: Path | None, device: str | None, force: bool) -> None:
    """Quantize the checkpoint in SRC (a folder, or tiny for the bundled model) into a new compressed-tensors
    folder OUT (resumes if interrupted)."""
    from klconvert.quantize import quantize as quantize_checkpoint

    result = quantize_checkpoint(resolve_model(src), out, bits=bits, group_size=group_size, symmetric=symmetric,
                                 scheme=scheme, recipe=recipe, device=device, force=force)
    click.echo(result.summary(), err=True)
    click.echo(str(result.path))


@cli.command(name="pull-and-quantize")
@click.option("--model", default=DEFAULT_REPO, show_default=True,
              help=f"Hub repo to pull, a local checkpoint folder (used as it is), or {BUNDLED_NAME} (the bundled "
                   "model).")
@click.option("--revision", default=None, help="Branch, tag or commit of the hub repo [default: main].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to create [default: ./<model-name>-w4a16, -w8a16 or -nf4].")
@_quantize_options
def pull_and_quantize(model: str, revision: str | None, out: Path | None, bits: int | None, group_size: int | None,
                      symmetric: bool | None, scheme: str | None, recipe: Path | None, device: str | None,
                      force: bool) -> None:
    """Pull a Kimi Linear repo (or take a local folder) and quantize it in one go."""
    from klconvert.quantize import pull_and_quantize as pull_and_quantize_checkpoint

    result = pull_and_quantize_checkpoint(model, out, revision=revision, bits=bits, group_size=group_size,
                                          symmetric=symmetric, scheme=scheme, recipe=recipe, device=device,
                                          force=force)
    click.echo(result.summary(), err=True)
    click.echo(str(result.path))


@cli.command(name="eval")
@click.option("--model", required=True, help="The model to measure (e.g. quantized): a folder, or tiny.")
@click.option("--reference", required=True,
              help="The model it should match (e.g. its bf16 source; tiny for the bundled model); its tokenizer "
                   "reads the text.")
@click.option("--text-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="UTF-8 text to run both models on.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Cut the tokenized text to this many tokens.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda if present].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help="Compute dtype [default: bfloat16 on cuda, float32 on cpu].")
def eval_(model: str, reference: str, text_file: Path, max_tokens: int, device: str | None,
          dtype: str | None) -> None:
    """Perplexity of both, KL of the model from the reference, top-1 and router agreement."""
    from klconvert.evaluate import evaluate, render_eval

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KLError(f"--text-file {text_file}: cannot read it as UTF-8 text ({e}); check the path") from None
    model, reference = resolve_model(model), resolve_model(reference)
    result = evaluate(model, reference, text, max_tokens=max_tokens, device=device, dtype=dtype)
    click.echo(render_eval(result, str(model), str(reference)))


def main() -> None:
    """Entry point: expected errors end in one line on stderr and exit status 2, with no traceback."""
    try:
        cli.main(standalone_mode=False)
    except KLError as e:
        click.echo(f"klconvert: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("klconvert: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("klconvert: interrupted", err=True)
        sys.exit(130)
