"""``ftkit estimate``: the training memory of one run per device, part by part, and whether it fits."""

from __future__ import annotations

import click

from ftkit.cli.output import print_json, print_table
from ftkit.errors import UsageError

EPILOG = """\b
Examples:
  $ ftkit estimate --model 1.5B --seq 256 --batch 4
  $ ftkit estimate --model 1.5B --seq 256 --batch 4 --formula megatron
  $ ftkit estimate --model 7B --method qlora --seq 1024 --gpu-mem 24GB
  $ ftkit estimate --model 3B --method lora --batch 4 --gpus 4   # DDP: per device
  $ ftkit estimate --model Qwen/Qwen2.5-3B-Instruct --method lora --target-modules all-linear
  $ ftkit estimate --model ./my-model --activation-checkpointing --explain
  $ ftkit estimate --model 0.5B --json | jq .components.total

\b
--model: a size (0.5B 1.5B 3B 7B 14B 32B 72B = Qwen2.5), a known id
(--list-models), a local model folder or config.json, or a hub id already
in the local Hugging Face / ModelScope cache (never downloaded).

\b
Units: MB and GB are 10^6 and 10^9 bytes (as in the Megatron paper);
--gpu-mem reads 24, 24GB and 24GiB all as 24 GiB, as GPU makers mean it.
The default formula models what ftkit trains (transformers + peft +
bitsandbytes on a Qwen2/Llama block); `--formula megatron` gives the
published s*b*h*(34 + 5*a*s/h) bytes per layer.

\b
Every number is per device. --gpus N models data parallelism (torchrun /
accelerate / ftkit run --nproc N: DDP): each device holds the whole model
and its own micro-batch, plus DDP's gradient buckets (trainable parameters
x gradient bytes); the effective batch is batch x grad-accum x N.

\b
--json keys (stable): model, settings, params {total, trainable},
components {weights, gradients, optimizer_states, activations_per_layer,
activations_layers, activations_other, logits_loss, evaluation, overhead,
total} (bytes), phases {train, eval} (each phase's peak, overhead included;
total is the larger), detail (every term with its formula), peak_phase
(the step phase of training, or "evaluation (KIND)"), per_device (true),
effective_batch, notes, gpu {bytes, source, fits, largest_batch} (gpu is
null without a GPU or --gpu-mem).
"""


def _positive_int(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a whole number; e.g. {option} 256") from None
    if value < 1:
        raise UsageError(f"{option}: {value} must be at least 1")
    return value


def format_bytes(n: float) -> str:
    """Decimal units, as the Megatron paper: 69.2 MB, 1.94 GB."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


@click.command(epilog=EPILOG)
@click.option("--model", "model_spec", metavar="MODEL", help="Size, model id, local folder or config.json.")
@click.option("--seq", default="512", show_default=True, help="Tokens per example (the longest in a batch).")
@click.option("--batch", default="1", show_default=True, help="Examples per device per step (micro-batch).")
@click.option("--method", type=click.Choice(["qlora", "lora", "full"]), default="qlora", show_default=True)
@click.option("--lora-r", default="8", show_default=True, help="LoRA rank.")
@click.option("--lora-dropout", type=float, default=0.05, show_default=True, help="LoRA dropout (ftkit's default).")
@click.option("--target-modules", default="q_proj,v_proj", show_default=True,
              help="Comma-separated modules LoRA adapts, or all-linear.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--optim", type=click.Choice(["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"]), default="adamw",
              show_default=True, help="Optimizer (train.optim): AdamW keeps 8 bytes of state per trainable "
              "parameter, the 8-bit ones 2.")
@click.option("--attn", type=click.Choice(["sdpa", "eager"]), default="sdpa", show_default=True,
              help="Attention kernel: sdpa keeps no seq x seq matrix; eager does.")
@click.option("--activation-checkpointing", is_flag=True, help="Keep only layer inputs; recompute in backward.")
@click.option("--head", type=click.Choice(["causal", "classifier"]), default="causal", show_default=True)
@click.option("--num-labels", default="2", show_default=True, help="Classes, with --head classifier.")
@click.option("--grad-accum", default="1", show_default=True, help="Gradient accumulation steps.")
@click.option("--eval", "eval_kind", type=click.Choice(["auto", "classifier", "labels", "generation", "perplexity",
                                                       "none"]), default="auto", show_default=True,
              help="What the evaluation runs: classifier logits, label scoring, generation (then perplexity), "
              "perplexity; auto: classifier for --head classifier, else generation.")
@click.option("--eval-batch", default="16", show_default=True, help="Evaluation batch size (eval.batch_size).")
@click.option("--max-new-tokens", default="64", show_default=True, help="Generation: longest reply (KV cache).")
@click.option("--gpus", default="1", show_default=True,
              help="Data-parallel GPUs (DDP): adds its gradient buckets per device; effective batch x N.")
@click.option("--gpu-mem", metavar="SIZE", help="GPU memory to fit into, e.g. 24GB (default: the probed GPU's).")
@click.option("--formula", type=click.Choice(["ftkit", "megatron"]), default="ftkit", show_default=True,
              help="Activation model: ftkit's (what really happens) or Megatron's as published.")
@click.option("--explain", is_flag=True, help="Show every formula with the numbers substituted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys below).")
@click.option("--list-models", is_flag=True, help="List the built-in model shapes and exit.")
def estimate(model_spec: str | None, seq: str, batch: str, method: str, lora_r: str, lora_dropout: float,
             target_modules: str, dtype: str, optim: str, attn: str, activation_checkpointing: bool, head: str,
             num_labels: str, grad_accum: str, eval_kind: str, eval_batch: str, max_new_tokens: str, gpus: str,
             gpu_mem: str | None, formula: str, explain: bool, as_json: bool, list_models: bool) -> None:
    """Estimate the GPU memory a fine-tuning run needs per device, part by part, and whether it fits.

    Weights (quantized or not), trainable parameters, gradients, optimizer states, activations per
    layer and in total, logits/loss, framework overhead; the evaluation's own peak (KV cache,
    logits); and the run's peak, the larger of training and evaluation. Then whether it fits the
    GPU and the largest batch that does. Pure arithmetic: answers instantly, imports no torch.
    """
    from ftkit.estimator import ALL_LINEAR, Settings, largest_batch
    from ftkit.estimator import estimate as run_estimate
    from ftkit.model_configs import KNOWN_MODELS, SIZES, resolve_shape

    if list_models:
        rows = [(size, f"Qwen/Qwen2.5-{size}") for size in SIZES]
        rows += [("", name) for name in KNOWN_MODELS if name not in {r[1] for r in rows}]
        print_table(("SIZE", "MODEL"), rows)
        return
    if not model_spec:
        raise UsageError("--model is required, e.g. `ftkit estimate --model 1.5B` (see --list-models)")
    targets = tuple(ALL_LINEAR) if target_modules.strip() == "all-linear" else tuple(
        m.strip() for m in target_modules.split(",") if m.strip())
    settings = Settings(
        seq=_positive_int("--seq", seq), batch=_positive_int("--batch", batch), method=method,
        lora_r=_positive_int("--lora-r", lora_r), lora_dropout=lora_dropout, target_modules=targets, dtype=dtype,
        optim=optim, attn=attn, activation_checkpointing=activation_checkpointing, head=head,
        num_labels=_positive_int("--num-labels", num_labels), grad_accum=_positive_int("--grad-accum", grad_accum),
        formula=formula, gpus=_positive_int("--gpus", gpus), eval_kind=eval_kind,
        eval_batch=_positive_int("--eval-batch", eval_batch),
        max_new_tokens=_positive_int("--max-new-tokens", max_new_tokens),
    )
    shape = resolve_shape(model_spec)
    result = run_estimate(shape, settings)
    gpu = _gpu_memory(gpu_mem)
    fit = None
    if gpu is not None:
        gpu_bytes, source = gpu
        fit = {"bytes": gpu_bytes, "source": source, "fits": result.total <= gpu_bytes,
               "largest_batch": largest_batch(shape, settings, gpu_bytes)}
    if as_json:
        print_json({**result.to_dict(), "gpu": fit})
        return
    _print_estimate(result, fit, explain)


def _gpu_memory(gpu_mem: str | None) -> tuple[int, str] | None:
    from ftkit.probe import parse_memory_size, probe_cuda

    if gpu_mem is not None:
        return parse_memory_size(gpu_mem, "--gpu-mem"), "--gpu-mem"
    devices, _ = probe_cuda()
    if not devices:
        return None
    best = max(devices, key=lambda d: d.total_bytes)
    return best.total_bytes, f"GPU {best.index}: {best.name}"


def _print_estimate(result, fit: dict | None, explain: bool) -> None:  # noqa: ANN001
    s, shape = result.settings, result.shape
    share = result.params_trainable / result.params_total
    click.secho(f"{shape.name}: {s.method}, seq {s.seq} × batch {s.batch} per device"
                f"{f' × accum {s.grad_accum}' if s.grad_accum > 1 else ''}, {s.dtype}, {s.attn}"
                f"{', activation checkpointing' if s.activation_checkpointing else ''}, {s.head} head", bold=True)
    click.echo(f"{result.params_total / 1e9:.2f} B parameters, {result.params_trainable:,} trainable ({share:.2%}); "
               f"{shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_heads} heads "
               f"({shape.num_kv_heads} KV), MLP {shape.intermediate_size}, vocab {shape.vocab_size:,}")
    devices = f"{s.gpus} GPUs (DDP)" if s.gpus > 1 else "1 GPU"
    click.echo(f"Effective batch: {s.effective_batch} = batch {s.batch} × accum {s.grad_accum} × {devices}; "
               "memory below is per device")
    click.echo()
    rows = [(t.name, format_bytes(t.bytes)) for t in result.weights]
    rows += [(result.gradients.name, format_bytes(result.gradients.bytes)),
             (result.optimizer.name, format_bytes(result.optimizer.bytes)),
             ("activations per layer", format_bytes(result.per_layer_bytes)),
             (f"activations, {shape.num_layers} layers", format_bytes(result.activation_layers.bytes))]
    other = sum(t.bytes for t in result.activation_other)
    if other:
        rows.append(("activations outside the layers", format_bytes(other)))
    rows.append(("logits / loss", format_bytes(result.logits_bytes)))
    rows.append(("training, overhead included", format_bytes(result.phases["train"])))
    if result.evaluation:
        rows.append((f"evaluation working memory ({s.evaluation}, batch {s.eval_batch})",
                     format_bytes(result.evaluation_bytes)))
        rows.append(("evaluation, weights and overhead included", format_bytes(result.phases["eval"])))
    rows.append(("framework overhead (at the peak)", format_bytes(sum(t.bytes for t in result.overhead))))
    rows.append((f"total (peak at {result.peak_phase})", format_bytes(result.total)))
    print_table(("COMPONENT", "MEMORY PER DEVICE"), rows)
    if explain:
        click.echo()
        click.secho("How each number is computed", bold=True)
        groups = [("weights", result.weights), ("gradients", [result.gradients]),
                  ("optimizer", [result.optimizer]), ("one layer's saved activations", result.activation_layer),
                  ("all layers", [result.activation_layers]), ("outside the layers", result.activation_other),
                  ("logits / loss", result.logits), ("evaluation (its widest moment)", result.evaluation),
                  ("overhead at the peak", result.overhead)]
        for title, terms in groups:
            if terms:
                click.echo(f"  {title}:")
                for term in terms:
                    click.echo(f"    {term.name}: {term.formula} = {format_bytes(term.bytes)}")
        click.echo("  training = the larger of (weights + optimizer + activations + logits [+ gradients kept]) and "
                   "(weights + optimizer + gradients + optimizer temporaries), plus overhead")
        click.echo("  evaluation = weights (without autocast copies) + evaluation working memory, plus overhead; "
                   "the optimizer states and gradients are freed before it")
        click.echo("  peak = the larger of training and evaluation")
    for note in result.notes:
        click.echo(f"Note: {note}")
    click.echo()
    if fit is None:
        click.echo("No CUDA GPU here: pass --gpu-mem (e.g. --gpu-mem 24GB) to check the fit on a card.")
        return
    where = f"{fit['bytes'] / 2**30:.1f} GiB ({format_bytes(fit['bytes'])}, {fit['source']})"
    if fit["fits"]:
        click.secho(f"Fits in {where}; the largest batch that fits: {fit['largest_batch']}.", fg="green")
    elif fit["largest_batch"]:
        click.secho(f"Does not fit in {where}; the largest batch that fits: {fit['largest_batch']} "
                    f"(raise --grad-accum to keep the effective batch).", fg="red")
    elif result.phases.get("eval", 0) > fit["bytes"]:
        click.secho(f"Does not fit in {where}: the evaluation alone needs {format_bytes(result.phases['eval'])}; "
                    f"lower --eval-batch (eval.batch_size) or --seq.", fg="red")
    else:
        click.secho(f"Does not fit in {where}, not even at batch 1; try --activation-checkpointing, "
                    f"--method qlora, a shorter --seq or a smaller model.", fg="red")
