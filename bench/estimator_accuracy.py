"""Activation-memory estimates against exact CPU measurements, over configurations drawn at random.

    python bench/estimator_accuracy.py                # 100 configurations, seed 17 (about 5 minutes on 2 cores)
    python bench/estimator_accuracy.py --seed 3 --count 200
    python bench/estimator_accuracy.py --quick        # 6 small configurations (what the tests check)
    python bench/estimator_accuracy.py --dump 12      # what configuration 12 saves, storage by storage

What is drawn (``sample_cases``, from ``--seed``): Llama or Qwen2 blocks (Qwen2 has q/k/v biases),
hidden 256–4096 (log-uniform) with head_dim 64 or 128, MHA, GQA or MQA (KV heads dividing heads), an
MLP 2.5–5.5× hidden (rounded to 64), a vocabulary of 32k–152k, tied or untied embeddings; a causal
LM or a sequence-classification head; full fine-tuning, LoRA or QLoRA; bf16, fp16 or fp32; SDPA or
eager attention; activation checkpointing on or off; a padded or unpadded batch; LoRA on any
non-empty subset of the seven linear layers (all seven a quarter of the time), r 4–128, dropout 0,
0.05 or 0.1. Sequence and batch shrink as the model grows, so that a forward stays within
``MAX_FLOPS``; a draw whose 3-layer model exceeds ``MAX_PARAMS`` parameters, or whose QLoRA layers
hold more than ``MAX_QUANTIZED`` weights to quantize, is drawn again (so the largest hidden sizes
come with smaller vocabularies, and QLoRA with hidden sizes up to about 2,500).

How each is built: the way ftkit trains it (``ftkit.modeling``), from its config with random
weights: the weights in ``weights_dtype(method, compute)`` (fp32 master weights for full
fine-tuning); QLoRA through bitsandbytes NF4 for real (``save_pretrained``, ``from_pretrained`` with
``quantization_config``, ``prepare_4bit_for_training``); LoRA through ``_add_lora`` (peft,
CAUSAL_LM or SEQ_CLS); checkpointing and ``use_cache`` as the Trainer sets them (non-reentrant, no
KV cache). The forward runs under ``torch.autocast("cpu")`` where ``mixed_precision(method,
compute, cuda=True)`` says a GPU run would (full fine-tuning in 16 bit; fp16 LoRA/QLoRA, which keep
AMP for its loss scaling): a CUDA run's numerics on CPU kernels, with ``torch.is_autocast_enabled()``
(no device: CUDA's, which peft's 4-bit layers ask) answering for the CPU's autocast. CPU and CUDA
autocast cast nearly, not exactly, the same ops, and CUDA's SDPA kernels are not the CPU's: what
this bench cannot see, ``bench/gpu_memory.py`` measures on a GPU (whole-step peaks with
``torch.cuda.max_memory_allocated``); this bench no longer runs on CUDA.

How the truth is measured: one forward pass under ``torch.autograd.graph.saved_tensors_hooks``,
adding up the bytes of the distinct storages saved for backward, and with checkpointing those its
layers' recompute functions keep (their keyword arguments: cos/sin, mask, position ids). Parameters
and buffers are excluded, and so are autocast's 16-bit copies of the weights (the estimator counts
them with the weights). Activations per layer do not depend on depth, so per layer = measured(3
layers) − measured(2 layers), on one model whose config runs 3, then 2 of its layers. The total is
the 2-layer model's: all layers, what is saved outside them (embedding ids, final norm, head input)
and the loss's saved tensors (the fp32 log-softmax over the vocabulary, the labels). With
checkpointing the backward pass also holds one recomputed layer: the per-layer measurement of the
same model with checkpointing off. The estimate is computed with ``device="cpu"`` (dropout masks
in their input's dtype, bool on CUDA) and the run's mixed precision.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftkit.estimator import ALL_LINEAR, Settings, estimate  # noqa: E402
from ftkit.model_configs import ModelShape  # noqa: E402

DEFAULT_SEED = 17
DEFAULT_COUNT = 100
QUICK_COUNT = 6
#: The 3-layer model's parameters at most (embeddings included): RAM and build time on a small CPU.
MAX_PARAMS = 1_200_000_000
#: QLoRA's 3 layers' linear weights at most: bitsandbytes quantizes about 20M weights a second on this CPU.
MAX_QUANTIZED = 300_000_000
#: Forward FLOPs per configuration at most (3 layers and the head): a second or two on 2 cores.
MAX_FLOPS = 150e9
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHORT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "g", "up_proj": "u",
                 "down_proj": "d"}


@dataclass(frozen=True)
class Case:
    """One configuration: the model's shape (2 layers, as the total is measured) and the run's settings."""

    shape: ModelShape
    settings: Settings

    def describe(self) -> list[str]:
        """The table cells that say what this configuration is."""
        shape, s = self.shape, self.settings
        lora = s.method != "full"
        targets = "all" if set(s.target_modules) == set(ALL_LINEAR) else "".join(
            SHORT_TARGETS[m] for m in ALL_LINEAR if m in s.target_modules)
        return [shape.model_type, str(shape.hidden_size), str(shape.intermediate_size),
                f"{shape.num_heads}/{shape.num_kv_heads}×{shape.head_dim}", f"{shape.vocab_size // 1000}k",
                "tied" if shape.tie_embeddings else "untied", "cls" if s.head == "classifier" else "lm",
                s.method, s.dtype, s.attn, "on" if s.activation_checkpointing else "off",
                "pad" if s.padded else "-", f"{s.seq}×{s.batch}", targets if lora else "",
                str(s.lora_r) if lora else "", f"{s.lora_dropout:g}" if lora else ""]


COLUMNS = ["arch", "h", "I", "heads", "V", "emb", "head", "method", "dtype", "attn", "ckpt", "pad", "s×b",
           "LoRA", "r", "drop"]


def sample_cases(seed: int, count: int, *, small: bool = False) -> list[Case]:
    """``count`` configurations drawn from ``seed``; ``small``: hidden 256–512 (the tests' quick check)."""
    rng = random.Random(seed)
    cases: list[Case] = []
    while len(cases) < count:
        case = _draw(rng, small)
        if case is not None:
            cases.append(case)
    return cases


def _draw(rng: random.Random, small: bool) -> Case | None:
    arch = rng.choice(("qwen2", "llama"))
    head_dim = rng.choice((64, 128))
    hidden_max = 512 if small else 4096
    # Hidden sizes log-uniform over 256–4096: as many small models as large ones.
    heads = max(256 // head_dim, round(2 ** rng.uniform(8, hidden_max.bit_length() - 1) / head_dim))
    hidden = heads * head_dim
    divisors = [k for k in range(1, heads + 1) if heads % k == 0]
    kv_heads = heads if rng.random() < 0.3 else rng.choice(divisors)
    intermediate = max(64, round(hidden * rng.uniform(2.5, 5.5) / 64) * 64)
    vocab = rng.randrange(32_000, 152_065, 64)
    tie = rng.random() < 0.5
    head = "classifier" if rng.random() < 0.3 else "causal"
    method = rng.choice(("full", "lora", "qlora"))
    dtype = rng.choice(("bf16", "fp16", "fp32"))
    targets = ALL_LINEAR if rng.random() < 0.25 else tuple(
        sorted(rng.sample(ALL_LINEAR, rng.randint(1, 6)), key=ALL_LINEAR.index))
    lora_r = rng.choice((4, 8, 16, 32, 64, 128))
    dropout = rng.choice((0.0, 0.05, 0.1))
    attn = rng.choice(("sdpa", "eager"))
    checkpointing = rng.random() < 0.35
    padded = rng.random() < 0.5
    batch = rng.randint(1, 4)
    seq = rng.choice((32, 64, 96, 128, 192, 256, 384, 512))
    shape = ModelShape(f"random-{arch}-{hidden}", hidden, intermediate, 2, heads, kv_heads, vocab, tie,
                       head_dim, arch, arch == "qwen2")
    layer_params = shape.layer_linear_params + shape.layer_other_params
    params = 3 * layer_params + shape.embedding_params
    if params > MAX_PARAMS or (method == "qlora" and 3 * shape.layer_linear_params > MAX_QUANTIZED):
        return None
    flops_per_token = 2 * (3 * layer_params + (0 if head == "classifier" else vocab * hidden))
    while seq > 32 and (seq * batch * flops_per_token > MAX_FLOPS or (attn == "eager" and seq * seq * batch * heads
                                                                        > 2**25)):
        seq //= 2
    while batch > 1 and seq * batch * flops_per_token > MAX_FLOPS:
        batch -= 1
    settings = Settings(seq=seq, batch=batch, method=method, lora_r=lora_r, lora_dropout=dropout,
                        target_modules=targets, dtype=dtype, attn=attn, activation_checkpointing=checkpointing,
                        head=head, num_labels=rng.randint(2, 20), padded=padded, device="cpu",
                        mixed_precision=_cuda_mixed_precision(method, dtype))
    return Case(shape, settings)


def _cuda_mixed_precision(method: str, dtype: str) -> bool:
    """Whether ftkit trains ``method`` in ``dtype`` under autocast on a GPU (ftkit.modeling.mixed_precision)."""
    import torch

    from ftkit.modeling import mixed_precision

    return mixed_precision(method, getattr(torch, TORCH_DTYPES[dtype]), True) is not None


# --- Building a model as ftkit trains it -------------------------------------------------------

def build(case: Case, layers: int = 3):  # noqa: ANN201 - a torch model
    """A ``layers``-layer model of ``case`` with random weights, ready to train as ftkit trains it."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    from ftkit.modeling import (
        _add_lora,
        keep_4bit_weights_trainable_on_cpu,
        prepare_4bit_for_training,
        quantization_config,
        weights_dtype,
    )

    shape, s = case.shape, case.settings
    compute = getattr(torch, TORCH_DTYPES[s.dtype])
    if shape.model_type == "qwen2":
        config_class, classes, extra = Qwen2Config, (Qwen2ForCausalLM, Qwen2ForSequenceClassification), {}
    else:
        config_class, classes = LlamaConfig, (LlamaForCausalLM, LlamaForSequenceClassification)
        extra = {"attention_bias": shape.qkv_bias, "head_dim": shape.head_dim}
    model_class = classes[s.head == "classifier"]
    config = config_class(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_embeddings, pad_token_id=shape.vocab_size - 1, num_labels=s.num_labels,
        attn_implementation=s.attn, **extra)
    model = _random_model(model_class, config, weights_dtype(s.method, compute))
    if s.method == "qlora":
        with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as folder:
            model.save_pretrained(folder)
            del model
            gc.collect()
            model = model_class.from_pretrained(folder, quantization_config=quantization_config(compute),
                                                dtype=compute, attn_implementation=s.attn)
        model = prepare_4bit_for_training(model, s.activation_checkpointing)
        keep_4bit_weights_trainable_on_cpu(model)
    if s.method != "full":
        method = SimpleNamespace(r=s.lora_r, alpha=2 * s.lora_r, dropout=s.lora_dropout,
                                 target_modules=list(s.target_modules))
        model = _add_lora(model, SimpleNamespace(method=method), s.head)
    if s.activation_checkpointing:
        model.activation_checkpointing_enable()  # as the Trainer does: non-reentrant, inputs require grad
    model.config.use_cache = False  # as the Trainer sets it (TrainingArguments.use_cache): no KV cache
    model.train()
    return model


def _random_model(model_class, config, dtype):  # noqa: ANN001, ANN202
    """``model_class(config)`` in ``dtype`` with random weights, in seconds where ``__init__`` takes minutes.

    Values do not change what is saved for backward: one random block, tiled over every parameter.
    """
    import torch

    with torch.device("meta"):
        model = model_class(config).to(dtype)
    model = model.to_empty(device="cpu")
    block = torch.empty(1 << 22).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                chunk = flat[start:start + block.numel()]
                chunk.copy_(block[:chunk.numel()])
        # The rotary frequencies are a buffer computed at construction: build that module for real.
        rotary = model.base_model.rotary_emb
        fresh = type(rotary)(config=config)
        for name, buffer in fresh.named_buffers():
            getattr(rotary, name).copy_(buffer)
    return model


def inputs(case: Case) -> dict:
    """One batch as ftkit's collators make it: dynamic padding (right), labels -100 on pads."""
    import torch

    shape, s = case.shape, case.settings
    generator = torch.Generator().manual_seed(0)
    pad = shape.vocab_size - 1
    ids = torch.randint(0, pad, (s.batch, s.seq), generator=generator)
    mask = torch.ones_like(ids)
    if s.padded:
        mask[-1, s.seq - max(1, s.seq // 4):] = 0  # the last example is a quarter shorter
        ids = ids.masked_fill(mask == 0, pad)
    if s.head == "classifier":
        labels = torch.randint(0, s.num_labels, (s.batch,), generator=generator)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- Measuring -----------------------------------------------------------------------------------

@dataclass
class Saved:
    """One storage saved for backward."""

    nbytes: int
    shape: tuple
    dtype: str
    module: str
    weight_copy: bool  # a cast of a parameter (autocast's 16-bit weight copies)


def saved_storages(model, case: Case) -> dict[int, Saved]:  # noqa: ANN001
    """The distinct non-parameter storages one forward pass of ``model`` saves for backward."""
    import torch

    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    parameters = {id(p) for p in model.parameters()}
    seen: dict[int, Saved] = {}
    where: list[str] = [""]
    names = {module: name for name, module in model.named_modules()}

    def enter(module, args) -> None:  # noqa: ANN001
        where.append(names.get(module, "?"))

    def leave(module, args, output) -> None:  # noqa: ANN001
        where.pop()

    def pack(tensor):  # noqa: ANN001, ANN202
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in owned and pointer not in seen:
            seen[pointer] = Saved(storage.nbytes(), tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                                  where[-1], _is_weight_copy(tensor, parameters))
        # Detached: a saved output kept with its grad_fn would make a reference cycle through
        # autograd's C++ graph that Python never collects (and this forward is never backpropagated).
        return tensor.detach()

    def keep_arguments(module, args, kwargs) -> None:  # noqa: ANN001
        # A checkpointed layer's recompute function holds its keyword arguments (rotary cos/sin, the
        # attention mask, position ids) until the backward pass: as good as saved.
        if module.gradient_checkpointing and module.training:
            where.append(names[module] + " (checkpoint's arguments)")
            for value in kwargs.values():
                for tensor in value if isinstance(value, tuple) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        pack(tensor)
            where.pop()

    from transformers.modeling_layers import GradientCheckpointingLayer

    handles = [module.register_forward_pre_hook(enter) for module in names] + \
              [module.register_forward_hook(leave, always_call=True) for module in names] + \
              [module.register_forward_pre_hook(keep_arguments, with_kwargs=True) for module in names
               if isinstance(module, GradientCheckpointingLayer)]
    amp = _cuda_like_autocast(case.settings.dtype) if case.settings.mixed_precision else nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), amp:
            loss = model(**inputs(case)).loss
        del loss
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextmanager
def _cuda_like_autocast(dtype: str):  # noqa: ANN202
    """CPU autocast standing in for CUDA's: ``torch.is_autocast_enabled()`` without a device (CUDA's,
    which peft's 4-bit LoRA layer asks to skip its fp32 cast) answers for the CPU's."""
    import torch

    original = torch.is_autocast_enabled

    def enabled(device_type: str | None = None) -> bool:
        return original("cpu" if device_type is None else device_type)

    torch.is_autocast_enabled = enabled
    try:
        with torch.autocast("cpu", dtype=getattr(torch, TORCH_DTYPES[dtype])):
            yield
    finally:
        torch.is_autocast_enabled = original


def _is_weight_copy(tensor, parameters: set[int]) -> bool:  # noqa: ANN001
    """Whether ``tensor`` is a parameter seen through casts and views (autocast's weight copies)."""
    node = tensor.grad_fn
    for _ in range(4):
        if node is None:
            return False
        if type(node).__name__ == "AccumulateGrad":
            return id(node.variable) in parameters
        if not type(node).__name__.startswith(("ToCopyBackward", "TBackward", "ViewBackward", "PermuteBackward",
                                                "TransposeBackward", "ExpandBackward")):
            return False
        node = node.next_functions[0][0] if node.next_functions else None
    return False


def activation_bytes(saved: dict[int, Saved]) -> int:
    return sum(item.nbytes for item in saved.values() if not item.weight_copy)


def _run_layers(model, layers: int) -> None:  # noqa: ANN001
    """Make ``model`` run its first ``layers`` decoder layers only (its later ones stay, unused)."""
    model.config.num_hidden_layers = layers
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.num_hidden_layers = layers


def measure(case: Case) -> dict[str, int]:
    """Exact bytes saved for backward: per layer, and the 2-layer total with the logits/loss (and, with
    checkpointing, the one layer the backward pass recomputes at a time)."""
    model = build(case, 3)
    result = {}
    for layers in (3, 2):
        _run_layers(model, layers)
        result[layers] = activation_bytes(saved_storages(model, case))
    measured = {"per_layer": result[3] - result[2], "total_2_layers": result[2]}
    if case.settings.activation_checkpointing:
        model.activation_checkpointing_disable()
        plain = {}
        for layers in (3, 2):
            _run_layers(model, layers)
            plain[layers] = activation_bytes(saved_storages(model, case))
        measured["total_2_layers"] += plain[3] - plain[2]
    del model
    gc.collect()
    return measured


def estimated(case: Case) -> dict[str, int]:
    """The estimator's numbers for what :func:`measure` measures."""
    est = estimate(case.shape, replace(case.settings, device="cpu"))
    saved_loss = sum(t.bytes for t in est.logits if "saved" in t.name)
    layers = case.shape.num_layers
    per_layer = (est.activation_layers.bytes - est.per_layer_bytes) // layers \
        if case.settings.activation_checkpointing else est.per_layer_bytes
    return {"per_layer": per_layer, "total_2_layers": est.activations_bytes + saved_loss}


def dump(case: Case) -> None:
    """Print what ``case``'s 2- and 3-layer forwards save, storage by storage, with the module that saved it
    (with checkpointing, then again with it off: what the recomputed layer saves)."""
    model = build(case, 3)
    for checkpointing in (True, False) if case.settings.activation_checkpointing else (False,):
        if not checkpointing and case.settings.activation_checkpointing:
            model.activation_checkpointing_disable()
        for layers in (3, 2):
            _run_layers(model, layers)
            saved = saved_storages(model, case)
            print(f"\n## {layers} layers{', checkpointing' if checkpointing else ''}: {activation_bytes(saved):,} B")
            for item in saved.values():
                print(f"{item.nbytes:>12,}  {item.dtype:<9} {str(item.shape):<24} {item.module}"
                      + ("  (weight copy)" if item.weight_copy else ""))
    est = estimate(case.shape, replace(case.settings, device="cpu"))
    print("\n## estimate, one layer")
    for term in est.activation_layer:
        print(f"{term.bytes:>12,}  {term.name}: {term.formula}")
    print(f"{est.activation_layers.bytes:>12,}  {est.activation_layers.name}: {est.activation_layers.formula}")
    for term in est.activation_other + est.logits:
        print(f"{term.bytes:>12,}  {term.name}: {term.formula}")


# --- The table -----------------------------------------------------------------------------------

def run(cases: list[Case]) -> tuple[list[float], int]:
    """Measure and estimate each case, printing one table row each: the errors (per layer and total
    of each case) and how many cases the estimate matches to the byte."""
    header = ["#", *COLUMNS, "per layer est MB", "meas MB", "err", "total est MB", "meas MB", "err"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    errors: list[float] = []
    exact = 0
    for number, case in enumerate(cases):
        truth = measure(case)
        guess = estimated(case)
        exact += guess == truth
        row = [str(number), *case.describe()]
        for key in ("per_layer", "total_2_layers"):
            error = (guess[key] - truth[key]) / truth[key]
            errors.append(error)
            row += [f"{guess[key] / 1e6:.2f}", f"{truth[key] / 1e6:.2f}", f"{error:+.2%}"]
        print("| " + " | ".join(row) + " |", flush=True)
    return errors, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"draws the configurations (default {DEFAULT_SEED})")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"configurations (default {DEFAULT_COUNT})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT} small configurations")
    parser.add_argument("--dump", type=int, metavar="N", help="print what configuration N saves, and its estimate")
    args = parser.parse_args()
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()  # the loading bars and deprecation notes of ~100 builds
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    cases = sample_cases(args.seed, QUICK_COUNT, small=True) if args.quick else sample_cases(args.seed, args.count)
    if args.dump is not None:
        print(cases[args.dump].describe())
        dump(cases[args.dump])
        return
    print(f"seed {args.seed}, {len(cases)} configurations" + (" (--quick)" if args.quick else "") + "\n")
    started = time.perf_counter()
    errors, exact = run(cases)
    worst = max(errors, key=abs)
    under = min(0.0, *errors)
    print(f"\n{len(cases)} configurations (seed {args.seed}), per layer and 2-layer total: worst error {worst:+.3%}, "
          f"worst under-estimate {under:+.3%}, {exact} of {len(cases)} exact to the byte "
          f"({time.perf_counter() - started:.0f} s). Goal: |error| ≤ 3%, never under by more than 1%.")


if __name__ == "__main__":
    main()
