"""Activation-memory estimates against exact measurements (CPU), and peak VRAM (CUDA, when present).

With CUDA present it then trains full-depth models (random weights) for three AdamW steps per case
(full, LoRA, QLoRA through bitsandbytes; checkpointing off/on) and compares
``torch.cuda.max_memory_allocated`` with the estimated peak less the CUDA context.

    python bench/estimator_accuracy.py            # the full grid (about 5 minutes on 2 cores)
    python bench/estimator_accuracy.py --quick    # 4 cases

How the truth is measured: each case builds a model with the real layer shapes of a Qwen2.5 model
from its config with random weights (bf16, as ftkit trains on GPU; LoRA r=8 on peft's default
q/v targets with dropout 0.05, as ftkit's recipe defaults; QLoRA through bitsandbytes NF4 and
peft's prepare_model_for_kbit_training), runs one forward pass on a padded batch under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the bytes of the distinct storages saved
for backward (parameters and buffers excluded). Activations per layer do not depend on depth, so
per layer = measured(3 layers) − measured(2 layers). With activation checkpointing (reentrant, so
the kept layer inputs pass through the hooks) the backward pass also holds one recomputed layer:
that is the no-checkpointing per-layer measurement of the same case. The vocabulary is cut to
8,192 to keep the CPU forward short: it only scales the logits/loss term, linearly, and that term is
measured and compared too. Dropout masks are fp32 on CPU (bool on CUDA): the estimate is computed
with ``device="cpu"`` for the comparison.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftkit.estimator import Settings, estimate  # noqa: E402
from ftkit.model_configs import KNOWN_MODELS, ModelShape  # noqa: E402

BENCH_VOCAB = 8192
BATCH = 2


def with_lora(model, settings: Settings):  # noqa: ANN001, ANN201
    """``model`` with ftkit's LoRA adapters for ``settings`` (unchanged for full fine-tuning)."""
    if settings.method not in ("lora", "qlora"):
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r,
                                            lora_dropout=settings.lora_dropout,
                                            target_modules=list(settings.target_modules), task_type="CAUSAL_LM"))


def build(shape: ModelShape, layers: int, settings: Settings):  # noqa: ANN201
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftkit.modeling import quantization_config

    config = Qwen2Config(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, vocab_size=BENCH_VOCAB,
        tie_word_embeddings=shape.tie_embeddings, attn_implementation=settings.attn, dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if settings.method == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            quant = quantization_config(torch.bfloat16)
            model = Qwen2ForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation=settings.attn)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if settings.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model = with_lora(model, settings)
    model.train()
    return model


def saved_bytes(model, seq: int) -> int:  # noqa: ANN001
    """Bytes of the distinct non-parameter storages one forward pass saves for backward."""
    import torch

    owned = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor):  # noqa: ANN001, ANN202
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, BENCH_VOCAB, (BATCH, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, seq * 3 // 4:] = 0  # dynamic padding: the shorter example is padded
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    del loss
    return sum(seen.values())


def measure(shape: ModelShape, settings: Settings) -> dict[str, int]:
    result = {}
    for layers in (2, 3):
        model = build(shape, layers, settings)
        result[layers] = saved_bytes(model, settings.seq)
        del model
        gc.collect()
    return {"per_layer": result[3] - result[2], "total_2_layers": result[2]}


def estimated(shape: ModelShape, settings: Settings) -> dict[str, int]:
    small = replace(shape, num_layers=2, vocab_size=BENCH_VOCAB)
    est = estimate(small, replace(settings, device="cpu"))
    saved_loss = sum(t.bytes for t in est.logits if "saved" in t.name)
    kept_input = settings.seq * settings.batch * shape.hidden_size * (4 if settings.method == "qlora" else 2)
    per_layer = kept_input if settings.activation_checkpointing else est.per_layer_bytes
    return {"per_layer": per_layer, "total_2_layers": est.activations_bytes + saved_loss,
            "recompute": est.per_layer_bytes}


def grid(quick: bool) -> list[tuple[ModelShape, Settings]]:
    shapes = [KNOWN_MODELS["Qwen/Qwen2.5-0.5B"], KNOWN_MODELS["Qwen/Qwen2.5-1.5B"]]
    cases = []
    for shape, attn, method, ckpt, seq in itertools.product(shapes, ("eager", "sdpa"), ("full", "lora"),
                                                            (False, True), (128, 512)):
        cases.append((shape, Settings(seq=seq, batch=BATCH, method=method, attn=attn, activation_checkpointing=ckpt)))
    for shape, ckpt, seq in itertools.product(shapes, (False, True), (128, 512)):
        cases.append((shape, Settings(seq=seq, batch=BATCH, method="qlora", attn="sdpa", activation_checkpointing=ckpt)))
    if quick:
        cases = [cases[0], cases[5], cases[19], cases[-1]]
    return cases


def cuda_peak(shape: ModelShape, settings: Settings, steps: int = 3) -> int:
    """torch.cuda.max_memory_allocated over real training steps of the full-depth model (CUDA only)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftkit.modeling import quantization_config

    config = Qwen2Config(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_embeddings, attn_implementation=settings.attn, dtype="bfloat16",
    )
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if settings.method == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            quant = quantization_config(torch.bfloat16)
            model = Qwen2ForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation=settings.attn, device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.activation_checkpointing)
    else:
        model = model.cuda()
        if settings.activation_checkpointing:
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
    model = with_lora(model, settings)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, shape.vocab_size, (settings.batch, settings.seq), device="cuda")
    mask = torch.ones_like(ids)
    mask[-1, settings.seq * 3 // 4:] = 0
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def cuda_table() -> None:
    """Estimated peak (without the CUDA context, which max_memory_allocated does not see) vs measured."""
    print("\n| model | method | ckpt | seq | batch | estimate GB (no context) | max_memory_allocated GB | err |")
    print("|---|---|---|---|---|---|---|---|")
    for size, method, ckpt in itertools.product(("0.5B", "1.5B"), ("full", "lora", "qlora"), (False, True)):
        shape = KNOWN_MODELS[f"Qwen/Qwen2.5-{size}"]
        settings = Settings(seq=512, batch=4, method=method, activation_checkpointing=ckpt)
        est = estimate(shape, settings)
        guess = est.total - sum(t.bytes for t in est.overhead if t.name == "CUDA context")
        truth = cuda_peak(shape, settings)
        print(f"| {size} | {method} | {'on' if ckpt else 'off'} | 512 | 4 | {guess / 1e9:.2f} | {truth / 1e9:.2f} "
              f"| {(guess - truth) / truth:+.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cases instead of the full grid")
    args = parser.parse_args()
    header = (f"| {'model':<5} | {'attn':<5} | {'method':<6} | {'ckpt':<4} | {'seq':>4} | {'per layer est MB':>16} "
              f"| {'measured MB':>11} | {'err':>6} | {'2-layer total est MB':>20} | {'measured MB':>11} | {'err':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    worst = 0.0
    started = time.perf_counter()
    no_ckpt_per_layer: dict[tuple, int] = {}
    for shape, settings in grid(args.quick):
        key = (shape.name, settings.attn, settings.method, settings.seq)
        truth = measure(shape, settings)
        guess = estimated(shape, settings)
        if not settings.activation_checkpointing:
            no_ckpt_per_layer[key] = truth["per_layer"]
        else:
            # The backward pass recomputes one layer at a time: it holds what that layer saves.
            recompute = no_ckpt_per_layer.get(key)
            if recompute is None:
                recompute = measure(shape, replace(settings, activation_checkpointing=False))["per_layer"]
            truth["total_2_layers"] += recompute
        errors = [(guess[k] - truth[k]) / truth[k] for k in ("per_layer", "total_2_layers")]
        worst = max(worst, *map(abs, errors))
        size = shape.name.split("-")[-1]
        print(f"| {size:<5} | {settings.attn:<5} | {settings.method:<6} | {'on' if settings.activation_checkpointing else 'off':<4} "
              f"| {settings.seq:>4} | {guess['per_layer'] / 1e6:>16.2f} | {truth['per_layer'] / 1e6:>11.2f} "
              f"| {errors[0]:>+6.1%} | {guess['total_2_layers'] / 1e6:>20.2f} | {truth['total_2_layers'] / 1e6:>11.2f} "
              f"| {errors[1]:>+6.1%} |", flush=True)
    print(f"\nworst error: {worst:.2%} ({time.perf_counter() - started:.0f} s)")
    import torch

    if torch.cuda.is_available():
        cuda_table()
    else:
        print("no CUDA GPU: peak-VRAM comparison (torch.cuda.max_memory_allocated) skipped")


if __name__ == "__main__":
    main()
