"""GPU memory: ftkit's estimate against the real peaks of training and evaluation (CUDA).

    python bench/gpu_memory.py                 # CUDA: 12 cases, about 3-5 minutes on one H200
    python bench/gpu_memory.py --json out.json # the rows as JSON too
    python bench/gpu_memory.py --smoke         # anywhere: the same code path on the CPU, tiny shape, nothing measured

Each case builds a model with the real shapes of Qwen2.5-0.5B or -1.5B (config from
``ftkit.model_configs``, the real 151,936-token vocabulary, random weights saved once per shape
to a temporary folder) and loads it with ftkit's own ``modeling.load_model``: LoRA and QLoRA keep
the base in bf16 (QLoRA in NF4 through bitsandbytes, then ``prepare_4bit_for_training``) with
ftkit's default adapters (r 8, alpha 16, dropout 0.05, peft's q/v targets); full fine-tuning keeps
fp32 master weights. Then it trains as the Trainer does for ftkit (``ftkit.training``): activation
checkpointing through ``activation_checkpointing_enable()``, full fine-tuning's forward wrapped as
accelerate wraps it for bf16 mixed precision (autocast, fp32 outputs; removed after training, as
``ftkit.pipeline`` removes it, so the fp32 weights are evaluated as they are), AdamW over the
trainable parameters, gradient
clipping at 1.0, ``zero_grad(set_to_none=True)``; 3 steps at seq 512, batch 4 (the last example's
last quarter is padding). It frees the optimizer and gradients, and evaluates with ftkit's
evaluator: ``generate`` (greedy, KV cache, 64 new tokens) and ``answer_nll`` on synthetic examples
whose prompts fill the whole sequence, eval batch 16, 2 batches (sizes: :class:`Plan`). Peaks are read per phase (``torch.cuda.reset_peak_memory_stats`` after
``empty_cache`` before each) and compared with ``ftkit.estimator``'s ``phases["train"]`` and
``phases["eval"]``, counted without the CUDA context (the allocator never sees it). Goal: every
case within ±10% of the reserved peak.

A case that fails is shown as failed and the others still run; the exit code is then 1. Cases
that would start after ``--budget-s`` seconds are skipped (device time is scarce).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MethodType, SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftkit.estimator import Settings, estimate
from ftkit.model_configs import KNOWN_MODELS, ModelShape

MODELS = ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B")
METHODS = ("lora", "qlora", "full")
GOAL = 0.10  # every case within ±10% of the reserved peak
LEARNING_RATE = 2e-4  # ftkit's train.lr default (no effect on memory)


@dataclass(frozen=True)
class Plan:
    """What every case runs: training and evaluation sizes, and where."""

    seq: int = 512
    batch: int = 4
    steps: int = 3
    eval_batch: int = 16
    eval_batches: int = 2
    max_new_tokens: int = 64
    answer_tokens: int = 32  # the gold answer's length in answer_nll (the prompt fills the rest)
    model_dtype: str = "auto"  # recipe model.dtype: auto is bf16 on CUDA
    smoke: bool = False


#: --smoke: the same code path with a tiny shape on the CPU (bf16 compute, as on the GPU).
SMOKE_PLAN = Plan(seq=32, batch=2, steps=2, eval_batch=4, eval_batches=2, max_new_tokens=8, answer_tokens=4,
                  model_dtype="bfloat16", smoke=True)


def smoke_shape(tokenizer) -> ModelShape:
    """hidden 64, 2 layers; the vocabulary just covers the tiny tokenizer's ids (2,048)."""
    vocab = max(512, -(-len(tokenizer) // 64) * 64)
    return ModelShape("smoke", 64, 128, 2, 4, 2, vocab, True)


@dataclass
class Row:
    """One case's phase: the estimate and what CUDA's allocator saw (None: not measured)."""

    model: str
    method: str
    ckpt: bool
    phase: str
    estimate: int | None
    allocated: int | None = None
    reserved: int | None = None
    status: str = "ok"  # ok, failed: ..., skipped: ...

    @property
    def error(self) -> float | None:
        if self.estimate is None or not self.reserved:
            return None
        return self.estimate / self.reserved - 1


# --- The model ---------------------------------------------------------------------------------

def save_random_model(shape: ModelShape, folder: Path, tokenizer, device: str) -> None:
    """A Qwen2 model of ``shape`` with random weights (seed 0), saved in bf16 as Qwen ships its weights."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from ftkit.tiny import save_quietly

    config = Qwen2Config(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_embeddings, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True, dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    save_quietly(model, folder)
    del model
    release()


def load(folder: Path, method: str, ckpt: bool, tokenizer, plan: Plan):
    """ftkit's ``modeling.load_model`` for a recipe with this method; checkpointing as the Trainer enables it."""
    from ftkit.modeling import load_model
    from ftkit.recipe import MethodSection, ModelSection, TrainSection

    recipe = SimpleNamespace(model=ModelSection(id=str(folder), source="local", dtype=plan.model_dtype),
                             method=MethodSection(name=method), train=TrainSection(activation_checkpointing=ckpt))
    loaded = load_model(folder, recipe, "causal", None, tokenizer)
    if loaded.method != method:
        raise RuntimeError(f"load_model ran {loaded.method}, not {method}: {'; '.join(loaded.notices)}")
    if ckpt:
        # What the Trainer does with activation_checkpointing=True (non-reentrant; it also makes
        # the embedding output require grad, for frozen bases).
        loaded.model.activation_checkpointing_enable()
    active = any(getattr(module, "gradient_checkpointing", False) for module in loaded.model.modules())
    if active != ckpt:
        raise RuntimeError(f"activation checkpointing is {'on' if active else 'off'}, the case asks for "
                           f"{'on' if ckpt else 'off'}")
    return loaded


# --- Training ----------------------------------------------------------------------------------

def padded_batch(vocab: int, pad_id: int, plan: Plan, device) -> dict:
    """Random token ids; the last example's last quarter is padding (labels -100 there)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (plan.batch, plan.seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, plan.seq - plan.seq // 4:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    return {name: t.to(device) for name, t in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def wrap_forward_for_amp(model, amp: str | None, device_type: str) -> None:
    """What accelerate's ``prepare_model`` does to the model the Trainer trains under native AMP
    (full fine-tuning in bf16): its forward runs under autocast and returns fp32 outputs. ftkit
    removes the wrapper after training (``pipeline._release_training_state``); so does
    :func:`train_steps`."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        return
    model._original_forward = model.forward
    model.forward = MethodType(torch.autocast(device_type=device_type, dtype=dtype)(model.forward.__func__), model)
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)


def forward_loss(model, batch: dict):
    """The Trainer's compute_loss: the loss alone; the outputs (logits) are dropped before backward."""
    return model(**batch)["loss"]


def train_steps(model, batch: dict, amp: str | None, plan: Plan) -> None:
    """``plan.steps`` optimizer steps as the Trainer takes them (adamw_torch, max_grad_norm 1.0)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    wrap_forward_for_amp(model, amp, batch["input_ids"].device.type)
    model.train()
    for _ in range(plan.steps):
        loss = forward_loss(model, batch)
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # Freed before evaluation, and the autocast wrapper removed, as ftkit.pipeline._release_training_state does.
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(model, keep_fp32_wrapper=False)
    optimizer.state.clear()
    del optimizer, params


# --- Evaluation --------------------------------------------------------------------------------

def synthetic_examples(tokenizer, plan: Plan) -> list:
    """Generation examples of random tokens whose prompts are longer than ``plan.seq`` (ftkit cuts them to it)."""
    from ftkit.tasks import Example

    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]

    def text(tokens: int) -> str:
        return tokenizer.decode([rng.choice(ordinary) for _ in range(tokens)])

    return [Example(input=text(2 * plan.seq), target=text(plan.answer_tokens))
            for _ in range(plan.eval_batch * plan.eval_batches)]


def evaluation_pass(model, tokenizer, examples: list, plan: Plan) -> dict:
    """ftkit's generation evaluation: ``generate`` then ``answer_nll``, in eval mode as ``evaluate`` runs them."""
    from ftkit.evaluator import answer_nll, generate
    from ftkit.recipe import EvalSection

    settings = EvalSection(batch_size=plan.eval_batch, max_new_tokens=plan.max_new_tokens)
    shapes: list[tuple[int, int]] = []  # (prompt width, new tokens) of each generate call
    original = model.generate

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        shapes.append((width, out.shape[1] - width))
        return out

    model.generate = counted  # bench instrumentation only: how long the KV cache really grew
    model.eval()
    try:
        generate(model, tokenizer, examples, settings, plan.eval_batch, plan.seq, "generating")
        _, count = answer_nll(model, tokenizer, examples, plan.eval_batch, plan.seq, "answer nll")
    finally:
        del model.generate
        model.train()
    return {"generate_calls": shapes, "nll_tokens": count}


# --- Measuring ---------------------------------------------------------------------------------

def release() -> None:
    """Free what is unreferenced and give the allocator's cached blocks back, then start a new peak."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks() -> tuple[int | None, int | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def estimated_phases(shape: ModelShape, method: str, ckpt: bool, plan: Plan) -> dict[str, int]:
    """ftkit's estimate of each phase's peak, without the CUDA context (not in the allocator's counts)."""
    settings = Settings(seq=plan.seq, batch=plan.batch, method=method, activation_checkpointing=ckpt,
                        eval_kind="generation", eval_batch=plan.eval_batch, max_new_tokens=plan.max_new_tokens,
                        cuda_context=False)
    result = estimate(shape, settings)
    return result.phases


def run_case(folder: Path, shape: ModelShape, name: str, method: str, ckpt: bool, tokenizer, examples: list,
             plan: Plan) -> list[Row]:
    """Train and evaluate one case; its two rows (train, eval)."""
    est = estimated_phases(shape, method, ckpt, plan)
    rows = [Row(name, method, ckpt, phase, est.get(phase)) for phase in ("train", "eval")]
    start = time.perf_counter()
    loaded = load(folder, method, ckpt, tokenizer, plan)
    model = loaded.model
    device = next(model.parameters()).device
    batch = padded_batch(shape.vocab_size, tokenizer.pad_token_id, plan, device)
    loaded_s = time.perf_counter() - start
    release()
    train_steps(model, batch, loaded.amp, plan)
    rows[0].allocated, rows[0].reserved = peaks()
    trained_s = time.perf_counter() - start - loaded_s
    del batch
    release()
    info = evaluation_pass(model, tokenizer, examples, plan)
    rows[1].allocated, rows[1].reserved = peaks()
    evaluated_s = time.perf_counter() - start - loaded_s - trained_s
    calls = ", ".join(f"{w}+{n}" for w, n in info["generate_calls"])
    say(f"    load {loaded_s:.1f} s, train {plan.steps} steps {trained_s:.1f} s "
        f"(amp {loaded.amp or 'none'}, weights {next(model.parameters()).dtype}), eval {evaluated_s:.1f} s "
        f"(generate prompt+new tokens per batch: {calls}; nll over {info['nll_tokens']} tokens)")
    del model, loaded
    release()
    return rows


# --- Output ------------------------------------------------------------------------------------

def say(line: str) -> None:
    print(line, flush=True)


def gb(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e9:.2f}" if value >= 1e7 else f"{value / 1e9:.3g}"  # the smoke shape's are MB


def table(rows: list[Row]) -> str:
    lines = ["| model | method | ckpt | phase | estimate GB | max allocated GB | max reserved GB | error vs reserved |",
             "|-------|--------|------|-------|-------------|------------------|-----------------|-------------------|"]
    for r in rows:
        error = r.error
        shown = f"{error:+.1%}" if error is not None else ("n/a" if r.status == "ok" else r.status)
        lines.append(f"| {r.model} | {r.method} | {'on' if r.ckpt else 'off'} | {r.phase} | {gb(r.estimate)} | "
                     f"{gb(r.allocated)} | {gb(r.reserved)} | {shown} |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    measured = [r for r in rows if r.error is not None]
    if not measured:
        return "Goal (every case within ±10% of the reserved peak): not checked, nothing was measured"
    worst = max(measured, key=lambda r: abs(r.error))
    where = f"{worst.model} {worst.method} ckpt {'on' if worst.ckpt else 'off'} {worst.phase}"
    missing = len(rows) - len(measured)
    met = abs(worst.error) <= GOAL and not missing
    return (f"Goal (every case within ±10% of the reserved peak): {'MET' if met else 'NOT MET'}; worst "
            f"{worst.error:+.1%} ({where})" + (f"; {missing} of {len(rows)} rows not measured" if missing else ""))


def header() -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (--smoke)"
    return (f"# {where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}; {time.strftime('%Y-%m-%d')}")


# --- Main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="no CUDA needed: a tiny shape on the CPU, nothing measured")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no case after this many seconds (default 420)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        say("No CUDA device: nothing measured (bench/gpu_memory.py --smoke checks the script on the CPU).")
        return 0
    plan = SMOKE_PLAN if args.smoke else Plan()
    device = "cuda" if cuda else "cpu"  # where ftkit's load_model puts the model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ftkit.tiny import tiny_model_path

    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    say(header())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    examples = synthetic_examples(tokenizer, plan)
    shapes = [smoke_shape(tokenizer)] if plan.smoke else [KNOWN_MODELS[name] for name in MODELS]
    cases = [(shape, method, ckpt) for shape in shapes for method, ckpt in itertools.product(METHODS, (False, True))]
    say(f"{len(cases)} cases: seq {plan.seq}, batch {plan.batch}, {plan.steps} steps; eval batch {plan.eval_batch} "
        f"x {plan.eval_batches}, {plan.max_new_tokens} new tokens")
    rows: list[Row] = []
    number = 0
    for shape in shapes:
        name = shape.name.removeprefix("Qwen/Qwen2.5-")
        with tempfile.TemporaryDirectory(prefix="ftkit-gpu-memory-") as folder:
            save_random_model(shape, Path(folder), tokenizer, device)
            for method, ckpt in itertools.product(METHODS, (False, True)):
                number += 1
                elapsed = time.perf_counter() - began
                say(f"[{number}/{len(cases)}] {name} {method} ckpt {'on' if ckpt else 'off'} (at {elapsed:.0f} s)")
                if elapsed > args.budget_s:
                    rows += [Row(name, method, ckpt, phase, None, status="skipped: time") for phase in ("train", "eval")]
                    say("    skipped: past --budget-s")
                    continue
                try:
                    rows += run_case(Path(folder), shape, name, method, ckpt, tokenizer, examples, plan)
                except Exception as error:  # noqa: BLE001 - report it and go on: the device time is scarce
                    traceback.print_exc()
                    status = f"failed: {type(error).__name__}"
                    rows += [Row(name, method, ckpt, phase, None, status=status) for phase in ("train", "eval")]
                    say(f"    {status}: {str(error).splitlines()[0] if str(error) else ''}")
                release()  # out here: the traceback no longer holds the failed case's tensors
    say("")
    say(table(rows))
    say("")
    say(verdict(rows) if not plan.smoke else "Goal: not checked (--smoke runs on the CPU; nothing is measured)")
    say(f"Total {time.perf_counter() - began:.0f} s")
    if args.json:
        payload = {"plan": asdict(plan), "rows": [{**asdict(r), "error": r.error} for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 1 if any(r.status.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
