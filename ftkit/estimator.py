"""Training-memory estimator: will this run fit my card?

Pure Python (no torch): ``ftkit estimate`` answers in milliseconds. Two activation models:

* ``megatron``: Korthikanti et al. 2022 (arXiv:2205.05198) §4, exactly as published:
  ``s·b·h·(34 + 5·a·s/h)`` bytes per layer. Already bytes (16-bit tensors and 1-byte dropout masks);
  for Qwen2.5-1.5B at s=256, b=4 that is 69.2 MB per layer, 1.94 GB over 28 layers.
* ``ftkit`` (default): the storages a Qwen2/Llama block saves for backward as ftkit trains it
  (transformers 5.x, peft, bitsandbytes), found by following the layer's data flow with each
  tensor's dtype and whether it needs a gradient (an op saves what its backward needs only then):
  RMSNorm's fp32 copy and rsqrt, GQA K/V (repeated to every head with a padding mask or in eager
  attention, a free view for a single KV head), the SwiGLU width, SDPA (no s×s matrix) or eager
  attention (fp32 softmax and the probabilities), peft's fp32 copy of each adapted module's input
  and LoRA dropout's masks and dropped copies, layer 0 saving less when its input (the frozen
  embedding's output) needs no gradient, activation checkpointing (each layer's input, the
  arguments its recompute keeps, one layer recomputed at a time), and the logits/loss term.
  ``bench/estimator_accuracy.py`` checks it against exact CPU measurements of configurations drawn
  at random (BENCHMARKS.md); q/k/v biases (Qwen2) change nothing it saves.

The estimate follows how ftkit trains (``ftkit.modeling``), never the reverse:

* LoRA and QLoRA run the base in its own dtype without autocast: the residual stream is 16-bit
  (QLoRA's embeddings and norms stay 16-bit, bitsandbytes returns each 4-bit matmul in its input's
  dtype), and peft casts each adapted module's input to its fp32 adapters. With fp16 on CUDA they
  keep AMP for its loss scaling: autocast casts the adapters' inputs back to 16 bit (peft's 4-bit
  layers then skip their fp32 cast).
* Full fine-tuning keeps fp32 master weights, gradients and AdamW states and computes in 16 bit
  under autocast: the fp32 embedding output keeps the residual stream, the norms' outputs and
  rotary cos/sin in fp32, and each linear layer saves its own 16-bit cast of its input (autocast
  casts an activation anew for every op).

``Settings.device`` matters twice: dropout masks (bool on CUDA, the input's dtype on CPU) and fp16
LoRA's autocast (CUDA only); ``Settings.mixed_precision`` overrides the latter. Every term is a
:class:`Term` with its formula, so ``--explain`` can show the arithmetic.

Everything is per device. Data parallelism (``gpus`` > 1, DDP as torchrun/accelerate run it) keeps a
whole copy of the model, its gradients, optimizer states and its micro-batch's activations on every
device, plus DDP's all-reduce buckets: one more copy of the trainable parameters' gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ftkit.errors import UsageError
from ftkit.model_configs import ModelShape

METHODS = ("full", "lora", "qlora")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
ATTENTION = ("sdpa", "eager")
HEADS = ("causal", "classifier")
FORMULAS = ("ftkit", "megatron")
#: What the evaluation runs (ftkit.evaluator): a classifier head's logits; label scoring with the LM
#: head (prompt KV cache + the labels' tokens); generation (KV cache to max_new_tokens) followed by
#: the gold answers' perplexity; perplexity alone; or nothing. auto: classifier for a classifier
#: head, else generation.
EVAL_KINDS = ("auto", "classifier", "labels", "generation", "perplexity", "none")
#: Answer tokens label scoring runs side by side in one row (ftkit.evaluator.ANSWER_TOKENS_PER_FORWARD).
LABEL_TOKENS_PER_ROW = 64
#: Positions whose vocabulary logits one chunk of the perplexity computes (ftkit.evaluator.NLL_POSITIONS).
NLL_POSITIONS = 256
#: peft's default LoRA targets for Llama-style decoders (qwen2, llama, mistral).
DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: NF4 with double quantization: 4 bits per weight, one 8-bit absmax per 64 weights, and one fp32
#: second-level absmax per 256 blocks (bitsandbytes' defaults).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: What the CUDA context takes outside PyTorch's allocator (cuBLAS/cuDNN handles, kernels): measured
#: 0.4–0.6 GB on recent drivers; not counted by torch.cuda.max_memory_allocated.
CUDA_CONTEXT_BYTES = 500 * 2**20
#: The caching allocator's fragmentation on top of live tensors, as a fraction of the dynamic part.
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class Settings:
    """What the run does (ftkit's recipe defaults where it has them); ``batch`` is per device."""

    seq: int
    batch: int = 1
    method: str = "qlora"
    lora_r: int = 8
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dtype: str = "bf16"
    optim: str = "adamw"
    attn: str = "sdpa"
    activation_checkpointing: bool = False
    head: str = "causal"
    num_labels: int = 2
    grad_accum: int = 1
    padded: bool = True  # dynamic padding leaves pad tokens in most batches: SDPA then repeats K/V
    device: str = "cuda"  # "cpu" to compare with CPU measurements (dropout masks in their input's dtype there)
    formula: str = "ftkit"
    gpus: int = 1  # data-parallel processes (DDP), one device each
    #: Whether the forward runs under autocast; None: as ftkit trains on ``device``
    #: (``ftkit.modeling.mixed_precision``: full fine-tuning in 16 bit, and fp16 LoRA/QLoRA on CUDA).
    mixed_precision: bool | None = None
    eval_kind: str = "auto"  # see EVAL_KINDS
    eval_batch: int = 16  # eval.batch_size
    max_new_tokens: int = 64  # eval.max_new_tokens (generation)
    #: Count the CUDA context. False when the budget is free memory read after CUDA started
    #: (``torch.cuda.mem_get_info``), which already excludes it.
    cuda_context: bool = True

    def __post_init__(self) -> None:
        for name, value in (("seq", self.seq), ("batch", self.batch), ("lora_r", self.lora_r),
                            ("grad_accum", self.grad_accum), ("num_labels", self.num_labels), ("gpus", self.gpus),
                            ("eval_batch", self.eval_batch), ("max_new_tokens", self.max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not a positive whole number")
        for name, value, allowed in (("method", self.method, METHODS), ("dtype", self.dtype, tuple(DTYPE_BYTES)),
                                     ("optim", self.optim, OPTIMIZERS), ("attn", self.attn, ATTENTION),
                                     ("head", self.head, HEADS), ("formula", self.formula, FORMULAS),
                                     ("eval_kind", self.eval_kind, EVAL_KINDS)):
            if value not in allowed:
                raise UsageError(f"--{name}: {value!r} is not one of {', '.join(allowed)}")
        if self.mixed_precision and self.dtype == "fp32":
            raise UsageError("`mixed_precision` needs a 16-bit dtype (bf16 or fp16), not fp32")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout: {self.lora_dropout} is not in [0, 1)")
        unknown = [m for m in self.target_modules if m not in ALL_LINEAR]
        if unknown or not self.target_modules:
            raise UsageError(f"--target-modules: {', '.join(unknown) or 'none given'}; choose from "
                             f"{', '.join(ALL_LINEAR)} or all-linear")

    @property
    def evaluation(self) -> str:
        """The evaluation kind, ``auto`` resolved by the head."""
        if self.eval_kind != "auto":
            return self.eval_kind
        return "classifier" if self.head == "classifier" else "generation"

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under autocast in ``dtype`` (fp32 master or adapter weights cast)."""
        if self.mixed_precision is not None:
            return self.mixed_precision
        return self.dtype != "fp32" and (self.method == "full" or (self.dtype == "fp16" and self.device == "cuda"))

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over all devices: batch x gradient accumulation x GPUs."""
        return self.batch * self.grad_accum * self.gpus


@dataclass(frozen=True)
class Term:
    """One component: its bytes and the formula that gave them, with the numbers substituted."""

    name: str
    bytes: int
    formula: str


@dataclass
class Estimate:
    shape: ModelShape
    settings: Settings
    params_total: int
    params_trainable: int
    weights: list[Term]
    gradients: Term
    optimizer: Term
    activation_layer: list[Term]  # one decoder layer, itemized
    activation_layers: Term  # all layers (with checkpointing: kept inputs + one recomputed layer)
    activation_other: list[Term]  # saved outside the layers: embedding ids, final norm, head input
    logits: list[Term]
    overhead: list[Term]
    peak_phase: str
    total: int = 0
    notes: list[str] = field(default_factory=list)
    #: The evaluation's working memory (besides the weights), itemized; empty with eval_kind "none".
    evaluation: list[Term] = field(default_factory=list)
    #: The peak of each phase of the run, overhead included: {"train": bytes, "eval": bytes}.
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def evaluation_bytes(self) -> int:
        return sum(t.bytes for t in self.evaluation)

    @property
    def weights_bytes(self) -> int:
        return sum(t.bytes for t in self.weights)

    @property
    def per_layer_bytes(self) -> int:
        return sum(t.bytes for t in self.activation_layer)

    @property
    def activations_bytes(self) -> int:
        """Saved for backward: all layers and what is saved outside them (logits/loss excluded)."""
        return self.activation_layers.bytes + sum(t.bytes for t in self.activation_other)

    @property
    def logits_bytes(self) -> int:
        return sum(t.bytes for t in self.logits)

    @property
    def components(self) -> dict[str, int]:
        return {
            "weights": self.weights_bytes,
            "gradients": self.gradients.bytes,
            "optimizer_states": self.optimizer.bytes,
            "activations_per_layer": self.per_layer_bytes,
            "activations_layers": self.activation_layers.bytes,
            "activations_other": sum(t.bytes for t in self.activation_other),
            "logits_loss": self.logits_bytes,
            "evaluation": self.evaluation_bytes,
            "overhead": sum(t.bytes for t in self.overhead),
            "total": self.total,
        }

    def to_dict(self) -> dict:
        def terms(items: list[Term]) -> list[dict]:
            return [asdict(t) for t in items]

        return {
            "model": {"name": self.shape.name, **{k: v for k, v in asdict(self.shape).items() if k != "name"}},
            "settings": {**asdict(self.settings), "target_modules": list(self.settings.target_modules)},
            "params": {"total": self.params_total, "trainable": self.params_trainable},
            "components": self.components,
            "detail": {
                "weights": terms(self.weights), "gradients": asdict(self.gradients),
                "optimizer_states": asdict(self.optimizer), "activations_per_layer": terms(self.activation_layer),
                "activations_layers": asdict(self.activation_layers),
                "activations_other": terms(self.activation_other), "logits_loss": terms(self.logits),
                "overhead": terms(self.overhead), "evaluation": terms(self.evaluation),
            },
            "phases": self.phases,
            "peak_phase": self.peak_phase,
            "per_device": True,
            "effective_batch": self.settings.effective_batch,
            "notes": self.notes,
        }


def megatron_layer_bytes(seq: int, batch: int, hidden: int, heads: int) -> int:
    """Korthikanti et al. 2022 §4: ``s·b·h·(34 + 5·a·s/h)`` bytes per layer (no recomputation)."""
    return 34 * seq * batch * hidden + 5 * heads * seq * seq * batch


def estimate(shape: ModelShape, settings: Settings) -> Estimate:
    """Peak training memory of one device for ``shape`` trained as ``settings`` say."""
    s = settings
    w = DTYPE_BYTES[s.dtype]
    quantized = s.method == "qlora"
    lora = s.method in ("lora", "qlora")
    master = s.method == "full" and s.dtype != "fp32"  # mixed precision: fp32 master weights
    notes: list[str] = []

    # --- Parameters -------------------------------------------------------------------------
    total_params = shape.num_params
    head_params = shape.hidden_size * s.num_labels if s.head == "classifier" else 0
    layers = shape.num_layers
    if s.head == "classifier":
        # AutoModelForSequenceClassification drops the LM head and adds a score layer.
        total_params += head_params - (0 if shape.tie_embeddings else shape.vocab_size * shape.hidden_size)
    linear = shape.linear_shapes()
    if lora:
        adapter = sum(s.lora_r * (linear[m][0] + linear[m][1]) for m in s.target_modules) * layers
        trainable = adapter + head_params  # peft trains the classifier's score layer as a saved module
    else:
        trainable = total_params

    # --- Weights ----------------------------------------------------------------------------
    weights: list[Term] = []
    if quantized:
        q_params = shape.layer_linear_params * layers
        weights.append(Term("weights (NF4, double quant)", round(q_params * NF4_BYTES_PER_PARAM),
                            f"{q_params:,} linear weights × {NF4_BYTES_PER_PARAM:.4f} B"))
        rest = total_params - q_params
        # Embeddings, norms, biases and the head stay in the compute dtype (modeling.prepare_4bit_for_training).
        weights.append(Term(f"weights (embeddings, norms, biases: {s.dtype})", rest * w, f"{rest:,} params × {w} B"))
    elif master:
        weights.append(Term("weights (fp32 master)", total_params * 4, f"{total_params:,} params × 4 B"))
        # autocast keeps its 16-bit copy of each weight it casts (every linear layer's, the head's)
        # until the step's forward and backward are done.
        head = head_params if s.head == "classifier" else shape.vocab_size * shape.hidden_size
        cast = shape.layer_linear_params * layers + head
        weights.append(Term(f"autocast {s.dtype} weight copies", cast * w, f"{cast:,} linear weights × {w} B"))
    else:
        weights.append(Term(f"weights ({s.dtype})", total_params * w, f"{total_params:,} params × {w} B"))
    if lora:
        weights.append(Term("LoRA adapters (fp32)", trainable * 4, f"{trainable:,} params × 4 B"))

    # --- Gradients and optimizer ------------------------------------------------------------
    grad_bytes = 4 if lora or master else w
    gradients = Term("gradients", trainable * grad_bytes, f"{trainable:,} trainable × {grad_bytes} B")
    state_bytes = {"adamw": 2 * grad_bytes, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}[s.optim]
    optimizer = Term(f"optimizer states ({s.optim})", trainable * state_bytes,
                     f"{trainable:,} trainable × {state_bytes} B" + (" (2 states)" if s.optim != "sgd" else ""))
    if master:
        notes.append(f"full fine-tuning: fp32 master weights, gradients and optimizer states; {s.dtype} compute "
                     "under autocast (mixed precision)")
    if s.optim == "paged_adamw_8bit":
        notes.append("paged_adamw_8bit: counted as resident; under pressure its pages move to CPU memory")

    # --- Activations ------------------------------------------------------------------------
    t = s.seq * s.batch
    tokens = f"{s.seq}·{s.batch}"
    if s.formula == "megatron":
        per = megatron_layer_bytes(s.seq, s.batch, shape.hidden_size, shape.num_heads)
        layer_terms = [Term(
            "Megatron per layer", per,
            f"s·b·h·(34 + 5·a·s/h) = {s.seq}·{s.batch}·{shape.hidden_size}·(34 + 5·{shape.num_heads}·{s.seq}/"
            f"{shape.hidden_size}) = {per:,} B")]
        all_layers = Term("activations, all layers", per * layers, f"{layers} layers × {per:,} B")
        other: list[Term] = []
        notes.append("--formula megatron: GPT-3-style blocks (MHA, 4h GeLU MLP, dropout, 16-bit), as published")
    else:
        layer_terms = _layer_terms(shape, s, t, tokens)
        per = sum(term.bytes for term in layer_terms)
        other = _outside_terms(shape, s, t, tokens)
        if s.activation_checkpointing:
            # Non-reentrant checkpointing (the Trainer's) keeps each layer's input, in the residual
            # stream's dtype (fp32 for full fine-tuning), and the backward pass recomputes one layer
            # at a time. The embedding's output needs a gradient then, so layer 0 is like the others.
            stream = _stream_bytes(s)
            kept = t * shape.hidden_size * stream
            all_layers = Term("activations, all layers (checkpointed)", layers * kept + per,
                              f"{layers} layer inputs × {tokens}·{shape.hidden_size} × {stream} B + one recomputed "
                              f"layer {per:,} B")
        else:
            first = _first_layer_saving(shape, s, t, tokens)
            less = f" − {first:,} B (layer 0 saves less: its input, the frozen embedding's output, needs no gradient)"
            all_layers = Term("activations, all layers", layers * per - first,
                              f"{layers} × {per:,} B" + (less if first else ""))
    logits = _logits_terms(shape, s, t, tokens)

    # --- Peak over the phases of a step -----------------------------------------------------
    static = sum(x.bytes for x in weights) + optimizer.bytes
    activations = all_layers.bytes + sum(x.bytes for x in other)
    logit_bytes = sum(x.bytes for x in logits)
    head_grad = 0 if lora else shape.vocab_size * shape.hidden_size * w  # the head's gradient comes first
    grads_during_backward = gradients.bytes if s.grad_accum > 1 else head_grad
    phases = {
        "backward start (activations + logits)": static + activations + logit_bytes + grads_during_backward,
        "optimizer step (gradients + states)": static + gradients.bytes + (trainable * grad_bytes
                                                                          if s.optim != "sgd" else 0),
    }
    peak_phase = max(phases, key=phases.get)
    dynamic = phases[peak_phase] - sum(x.bytes for x in weights)
    context = [Term("CUDA context", CUDA_CONTEXT_BYTES, "cuBLAS/cuDNN handles and kernels (typical)")] \
        if s.device == "cuda" and s.cuda_context else []
    overhead = [Term("allocator slack", round(dynamic * ALLOCATOR_SLACK), f"{ALLOCATOR_SLACK:.0%} of the "
                     f"{dynamic:,} B that come and go"), *context]
    if s.gpus > 1:
        # DDP copies gradients into flat buckets to all-reduce them; the buckets live as long as
        # the model, so they add to every phase of the step.
        overhead.append(Term("DDP gradient buckets", trainable * grad_bytes,
                             f"{trainable:,} trainable × {grad_bytes} B (all-reduce buffers, on each of "
                             f"{s.gpus} devices)"))
    total = phases[peak_phase] + sum(x.bytes for x in overhead)

    # --- The evaluation (baselines before training, the fine-tuned model after) -------------
    # The optimizer states and gradients are gone by then (the pipeline frees them); autocast's
    # weight copies too: a full fine-tuning run evaluates its fp32 weights as they are.
    evaluation = _eval_terms(shape, s)
    eval_weights = sum(x.bytes for x in weights if not x.name.startswith("autocast"))
    eval_dynamic = sum(x.bytes for x in evaluation)
    eval_overhead = [Term("allocator slack", round(eval_dynamic * ALLOCATOR_SLACK),
                          f"{ALLOCATOR_SLACK:.0%} of the {eval_dynamic:,} B that come and go"), *context]
    eval_total = eval_weights + eval_dynamic + sum(x.bytes for x in eval_overhead) if evaluation else 0
    run_phases = {"train": total, "eval": eval_total}
    if eval_total > total:
        peak_phase, overhead, total = f"evaluation ({s.evaluation})", eval_overhead, eval_total
    return Estimate(
        shape=shape, settings=s, params_total=total_params, params_trainable=trainable, weights=weights,
        gradients=gradients, optimizer=optimizer, activation_layer=layer_terms, activation_layers=all_layers,
        activation_other=other, logits=logits, overhead=overhead, peak_phase=peak_phase, total=total, notes=notes,
        evaluation=evaluation, phases=run_phases,
    )


def _stream_bytes(s: Settings) -> int:
    """Bytes per value of the residual stream: the weights' dtype (fp32 master weights for full
    fine-tuning, whose fp32 embedding output and residual adds stay fp32 under autocast)."""
    return 4 if s.method == "full" else DTYPE_BYTES[s.dtype]


def _compute_bytes(s: Settings) -> int:
    """Bytes per value of what the linear layers and attention return: 16 bit under autocast, else
    the weights' dtype."""
    return 2 if s.autocast else _stream_bytes(s)


@dataclass(frozen=True)
class _Tensor:
    """A tensor in a layer's data flow: one storage, ``width`` values per token."""

    key: str  # the storage's identity: saved by several ops, it is counted once
    width: int
    nbytes: int  # per value
    grad: bool  # needs a gradient: only then do the ops that use it save what their backward needs


class _Saved:
    """The storages saved for backward, each counted once, as terms with their formulas."""

    def __init__(self, t: int, tokens: str) -> None:
        self.t, self.tokens = t, tokens
        self.terms: list[Term] = []
        self.keys: set[str] = set()

    def add(self, key: str, name: str, width: int, nbytes: int, copies: int = 1) -> None:
        """``copies`` storages of ``t·width`` values of ``nbytes``, unless ``key`` is already saved."""
        if copies < 1 or key in self.keys:
            return
        self.keys.add(key)
        self.terms.append(Term(name, copies * self.t * width * nbytes,
                               f"{f'{copies} × ' if copies > 1 else ''}{self.tokens}·{width} × {nbytes} B"))

    def add_raw(self, key: str, name: str, nbytes: int, formula: str) -> None:
        if key not in self.keys:
            self.keys.add(key)
            self.terms.append(Term(name, nbytes, formula))


def _dtype_name(nbytes: int, s: Settings) -> str:
    return "fp32" if nbytes == 4 else s.dtype


def _layer_terms(shape: ModelShape, s: Settings, t: int, tokens: str, *, input_grad: bool = True) -> list[Term]:
    """What one decoder layer saves for backward as ftkit trains it, storage by storage.

    Follows the layer's data flow (transformers' Qwen2/Llama block, peft's LoRA layers, bitsandbytes'
    4-bit matmul) with each tensor's dtype and whether it needs a gradient, since an op saves what
    its backward needs only when one of its inputs does. ``input_grad`` is False for layer 0 under
    LoRA/QLoRA without checkpointing: its input, the frozen embedding's output, needs no gradient.
    """
    h, i, r = shape.hidden_size, shape.intermediate_size, s.lora_r
    q_width, kv_width, heads = shape.q_width, shape.kv_width, shape.num_heads
    full, amp = s.method == "full", s.autocast
    stream, compute = _stream_bytes(s), _compute_bytes(s)
    targets = set() if full else set(s.target_modules)
    # peft casts an adapted module's input to its fp32 adapters; its bitsandbytes 4-bit layers skip
    # the cast under autocast (torch.is_autocast_enabled(), CUDA's: fp16 QLoRA on a GPU).
    adapter_in = compute if s.method == "qlora" and amp else 4
    mask = 1 if s.device == "cuda" else adapter_in  # dropout mask: bool on CUDA, the input's dtype on CPU
    saved = _Saved(t, tokens)

    def norm(label: str, x: _Tensor) -> _Tensor:
        """RMSNorm: an fp32 copy of its input and the rsqrt; the normalized values for its weight's gradient."""
        if x.grad:
            saved.add(x.key if x.nbytes == 4 else f"{label} fp32", f"{label}: fp32 input", h, 4)
            saved.add(f"{label} rsqrt", f"{label}: rsqrt", 1, 4)
        if full:
            saved.add(f"{label} normalized", f"{label}: normalized (weight grad)", h, x.nbytes)
        return _Tensor(f"{label} output", h, stream, x.grad or full)

    def lora(label: str, chosen: list[str], x: _Tensor) -> None:
        """peft's LoRA branches of the ``chosen`` modules on their shared input ``x``."""
        n = len(chosen)
        if not n:
            return
        a_input = 2 if amp else adapter_in  # what lora_A's matmul saves: its input, cast by autocast
        if s.lora_dropout == 0 and x.nbytes == adapter_in == a_input:
            saved.add(x.key, f"{label} LoRA A input ({_dtype_name(x.nbytes, s)}, shared)", x.width, x.nbytes)
        else:
            if s.lora_dropout > 0 and x.grad:
                saved.add(f"{label} masks", f"{label} LoRA dropout masks ({n})", x.width, mask, n)
            what = "dropped" if s.lora_dropout > 0 else "copies"
            if a_input != adapter_in:
                what += f", {_dtype_name(a_input, s)} casts"
            saved.add(f"{label} A inputs", f"{label} LoRA A inputs, {what} ({n})", x.width, a_input, n)
        saved.add(f"{label} B inputs", f"{label} LoRA B inputs ({n})", r, 2 if amp else 4, n)

    def linears(label: str, group: tuple[str, ...], x: _Tensor, widths: tuple[int, ...]) -> list[_Tensor]:
        """The linear layers of ``group`` on their shared input ``x``: what they save, and their outputs."""
        if full and amp and x.nbytes != 2:
            # autocast casts the input of each op anew (it caches only the weights' casts).
            n = len(group)
            saved.add(f"{label} casts", f"{label} input{'s' if n > 1 else ''}, {s.dtype} cast{'s' if n > 1 else ''} "
                      "(weight grads)", x.width, 2, n)
        elif full:
            saved.add(x.key, f"{label} input (weight grad{'s' if len(group) > 1 else ''})", x.width, x.nbytes)
        else:
            lora(label, [m for m in group if m in targets], x)
        return [_Tensor(f"{m} output", width, compute, x.grad or full or m in targets)
                for m, width in zip(group, widths)]

    x = _Tensor("layer input", h, stream, input_grad)
    q, k, v = linears("q/k/v", ("q_proj", "k_proj", "v_proj"), norm("input_layernorm", x),
                      (q_width, kv_width, kv_width))
    # Rotary embedding: q·cos + rotate(q)·sin saves only cos/sin (shared by all layers, counted
    # outside); with cos/sin in the stream's dtype, q and k come out in it.
    # transformers lets SDPA run GQA itself (enable_gqa) only without a mask; with one (padding), and
    # always in eager attention, it repeats K/V to every head first: a copy, except for a single KV
    # head, whose repeat is a view of it (stride 0) until something copies it.
    repeated = shape.num_kv_heads < heads and (s.padded or s.attn == "eager")
    single = shape.num_kv_heads == 1

    def kv_width_saved(cast: bool) -> int:
        if not repeated or (single and not cast and (s.attn == "sdpa" or s.batch == 1)):
            return kv_width
        # A copy per head: repeat_kv's, autocast's cast of the view, or eager matmul's (it folds
        # batch and heads into one dimension, which a stride-0 view of several examples cannot).
        return q_width

    k_saved, v_saved = kv_width_saved(stream != compute), kv_width_saved(False)
    k_label = " (repeated)" if k_saved != kv_width else ""
    v_label = " (repeated)" if v_saved != kv_width else ""
    if s.attn == "sdpa":
        # Autocast casts q/k/v to 16 bit.
        if q.grad or k.grad or v.grad:
            saved.add("sdpa q", "SDPA: q", q_width, compute)
            if k_saved == v_saved:
                saved.add("sdpa kv", f"SDPA: k, v{k_label}", k_saved, compute, 2)
            else:
                saved.add("sdpa k", f"SDPA: k{k_label}", k_saved, compute)
                saved.add("sdpa v", f"SDPA: v{v_label}", v_saved, compute)
            saved.add("attention output", "SDPA: output", q_width, compute)
            saved.add("sdpa logsumexp", "SDPA: logsumexp (fp32)", heads, 4)
            if s.padded:
                # The boolean padding mask, turned into an additive one in q's dtype by each call.
                saved.add_raw("sdpa mask", "SDPA: additive padding mask", s.batch * s.seq * s.seq * compute,
                              f"{s.batch}·{s.seq}² × {compute} B")
        out = _Tensor("attention output", q_width, compute, q.grad or k.grad or v.grad)
    else:
        scores = s.batch * heads * s.seq * s.seq
        score_grad = q.grad or k.grad
        if k.grad:
            saved.add("eager q", "eager: q", q_width, compute)
        if q.grad:
            saved.add("eager k", f"eager: k{k_label}", k_saved, compute)
        if score_grad:
            saved.add_raw("softmax", "eager: softmax (fp32)", scores * 4, f"{s.batch}·{heads}·{s.seq}² × 4 B")
        if v.grad:
            # The probabilities in q's dtype (the stream's), cast again by autocast for the matmul.
            key = "softmax" if stream == 4 and not amp else "probabilities"
            saved.add_raw(key, f"eager: probabilities ({_dtype_name(compute, s)})", scores * compute,
                          f"{s.batch}·{heads}·{s.seq}² × {compute} B")
        if score_grad:
            saved.add("eager v", f"eager: v{v_label}", v_saved, compute)
        # Its output, transposed back to tokens × heads, is a new contiguous tensor.
        out = _Tensor("eager output", q_width, compute, score_grad or v.grad)
    (o,) = linears("o_proj", ("o_proj",), out, (h,))
    residual = _Tensor("residual", h, stream, x.grad or o.grad)
    gate, up = linears("gate/up", ("gate_proj", "up_proj"), norm("post_attention_layernorm", residual), (i, i))
    if gate.grad:
        saved.add("gate", "MLP: gate (SiLU input)", i, compute)
    if up.grad:
        saved.add("act", "MLP: act(gate)", i, compute)
    if gate.grad:
        saved.add("up", "MLP: up", i, compute)
    linears("down_proj", ("down_proj",), _Tensor("act·up", i, compute, gate.grad or up.grad), (h,))
    return saved.terms


def _first_layer_saving(shape: ModelShape, s: Settings, t: int, tokens: str) -> int:
    """What layer 0 saves less than the others under LoRA/QLoRA without checkpointing: its input (the
    frozen embedding's output) needs no gradient, so only the ops downstream of an adapter save."""
    if s.method == "full" or s.activation_checkpointing:
        return 0
    every = sum(term.bytes for term in _layer_terms(shape, s, t, tokens))
    return every - sum(term.bytes for term in _layer_terms(shape, s, t, tokens, input_grad=False))


def _outside_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    """Saved outside the layers: rotary cos/sin, the final norm, the embedding's ids and the head's input."""
    h = shape.hidden_size
    stream = _stream_bytes(s)
    head_input = 2 if s.autocast else stream  # autocast casts the head's input for its matmul
    terms = [
        Term("rotary cos/sin", 2 * s.seq * shape.head_dim * stream, f"2·{s.seq}·{shape.head_dim} × {stream} B"),
        Term("final norm: fp32 input + rsqrt", t * h * 4 + t * 4, f"{tokens}·({h}·4 + 4) B"),
    ]
    if s.method == "full":
        terms.append(Term("embedding: token ids", t * 8, f"{tokens} × 8 B"))
        terms.append(Term("final norm: normalized (weight grad)", t * h * stream, f"{tokens}·{h} × {stream} B"))
    if s.head == "classifier":
        # The score layer trains with every method (peft's modules_to_save for LoRA/QLoRA).
        terms.append(Term("score head input", t * h * head_input, f"{tokens}·{h} × {head_input} B"))
    elif s.method == "full":
        terms.append(Term("lm_head input (weight grad)", t * h * head_input, f"{tokens}·{h} × {head_input} B"))
    if s.activation_checkpointing:
        # Each checkpointed layer's recompute function holds its keyword arguments until the backward
        # pass: cos/sin (above), the position ids and the attention mask (eager's additive one in the
        # stream's dtype; SDPA's boolean one, only with padding).
        terms.append(Term("position ids (kept for the recompute)", s.seq * 8, f"{s.seq} × 8 B"))
        mask = stream if s.attn == "eager" else 1 if s.padded else 0
        if mask:
            terms.append(Term("attention mask (kept for the recompute)", s.batch * s.seq * s.seq * mask,
                              f"{s.batch}·{s.seq}² × {mask} B"))
    return terms


def _logits_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    """The loss's saved tensors (fp32 log-softmax over the vocabulary, the labels) and the logits'
    transient memory at the start of the backward pass."""
    if s.head == "classifier":
        # The last token's logits are picked (two index tensors) and their log-softmax saved, in the
        # logits' dtype (autocast runs it in fp32), with the labels.
        n = s.num_labels
        e = 4 if s.autocast else _stream_bytes(s)
        return [Term("classifier log-softmax + indices (saved)", s.batch * n * e + 3 * s.batch * 8 + e,
                     f"{s.batch}·{n} × {e} B + 3·{s.batch} × 8 B + {e} B")]
    v = shape.vocab_size
    logit_dtype = _compute_bytes(s)
    terms = [
        Term("log-softmax (fp32, saved)", t * v * 4, f"{tokens}·{v} × 4 B"),
        # The labels, padded by one and shifted: a copy, except for one example (a view of the pad).
        Term("labels (int64, saved)", (t + (s.batch == 1)) * 8 + 4,
             f"{tokens}{' + 1' if s.batch == 1 else ''} × 8 B + 4 B"),
        # Alive at the start of backward: the logits the model returns and the fp32 gradient of the
        # loss with respect to them.
        Term("logits + their gradient (transient)", t * v * (logit_dtype + 4),
             f"{tokens}·{v} × ({logit_dtype} + 4) B"),
    ]
    return terms


def largest_batch(shape: ModelShape, settings: Settings, gpu_bytes: int, *, limit: int = 4096) -> int:
    """The largest micro-batch whose estimate fits in ``gpu_bytes``; 0 if even one example does not."""
    from dataclasses import replace

    def fits(batch: int) -> bool:
        return estimate(shape, replace(settings, batch=batch)).total <= gpu_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _inference_layer_peak(shape: ModelShape, s: Settings, rows: int, length: int, context: int, e: int) -> Term:
    """The most an inference forward of ``rows`` x ``length`` tokens (attending to ``context``
    positions) holds at once, besides a KV cache: the attention mask and rotary cos/sin every
    layer shares, the embeddings (the model keeps them to the end), one layer's input, residual and
    normed input, and its widest step: the MLP's act(gate), up and their product, or attention's
    q/k/v (k/v repeated to every head) and output, or eager attention's scores (two at once:
    16-bit with a fp32 softmax)."""
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_width, shape.kv_width
    t = rows * length
    mask_bytes = 1 if s.attn == "sdpa" else e  # SDPA takes a boolean mask, eager an additive one
    shared = rows * length * context * mask_bytes + 2 * t * shape.head_dim * e
    shared_text = f"mask {rows}·{length}·{context} × {mask_bytes} B + cos/sin 2·{t}·{shape.head_dim} × {e} B"
    if s.method != "full" and e != 4:
        # peft runs an adapted module's LoRA branch in fp32: a copy of its input and the branch's output.
        widths = [shape.linear_shapes()[m] for m in s.target_modules]
        wide = max(fan_in for fan_in, _ in widths) + max(fan_out for _, fan_out in widths)
        shared += t * wide * 4
        shared_text += f" + LoRA fp32 input and output {t}·{wide} × 4 B"
    if s.method == "qlora":
        # bitsandbytes dequantizes a 4-bit weight to the compute dtype for a multi-token matmul.
        largest = max(fan_in * fan_out for fan_in, fan_out in shape.linear_shapes().values())
        shared += largest * e
        shared_text += f" + one dequantized weight {largest:,} × {e} B"
    scores = rows * shape.num_heads * length * context
    mlp = t * (4 * h + 3 * i) * e
    # Eager attention returns its probabilities, and the layer holds them until it returns.
    probabilities = scores * e if s.attn == "eager" else 0
    attention = t * (3 * h + 4 * q + 2 * kv) * e + (scores * (e + 4) if s.attn == "eager" else 0)
    if mlp + probabilities >= attention:
        return Term(f"forward, one layer at a time ({rows}·{length} tokens, MLP)", shared + mlp + probabilities,
                    f"{rows}·{length}·(4·{h} + 3·{i}) × {e} B + {shared_text}"
                    + (f" + attention probabilities {rows}·{shape.num_heads}·{length}·{context} × {e} B"
                       if probabilities else ""))
    formula = f"{rows}·{length}·(3·{h} + 4·{q} + 2·{kv}) × {e} B + {shared_text}"
    if s.attn == "eager":
        formula += f" + scores {rows}·{shape.num_heads}·{length}·{context} × ({e} + 4) B"
    return Term(f"forward, one layer at a time ({rows}·{length} tokens, attention)", shared + attention, formula)


def _kv_cache(shape: ModelShape, rows: int, length: int, e: int, what: str) -> Term:
    n = 2 * shape.num_layers * rows * length * shape.kv_width
    return Term(what, n * e, f"2·{shape.num_layers} layers·{rows}·{length}·{shape.kv_width} × {e} B")


def _eval_terms(shape: ModelShape, s: Settings) -> list[Term]:
    """The evaluation's working memory besides the weights (ftkit.evaluator, under inference_mode).

    Nothing is saved for backward; what counts is the widest moment, and only its terms are
    returned: a layer's transient tensors, the KV cache where the evaluation keeps one, and the
    vocabulary logits where it makes them (the last position for generation and for label
    scoring's first token, at most LABEL_TOKENS_PER_ROW per row for the labels' other tokens,
    NLL_POSITIONS at a time for perplexity). A full fine-tuning run evaluates its fp32 master
    weights in fp32. Label and answer lengths are not known here: their bounds count.
    """
    kind = s.evaluation
    if kind == "none":
        return []
    e = 4 if s.method == "full" else DTYPE_BYTES[s.dtype]
    b, n, v, h = s.eval_batch, s.seq, shape.vocab_size, shape.hidden_size
    upcast = 0 if e == 4 else 4  # .float() copies 16-bit logits; fp32 ones stay as they are
    forward = _inference_layer_peak(shape, s, b, n, n, e)
    if kind == "classifier":
        return [forward, Term("classifier logits", b * n * s.num_labels * e + b * s.num_labels * 4,
                              f"{b}·{n}·{s.num_labels} × {e} B + fp32 copy")]

    def widest(*moments: list[Term]) -> list[Term]:
        return max(moments, key=lambda terms: sum(t.bytes for t in terms))

    positions = min(NLL_POSITIONS, b * n)
    nll = widest([forward], [
        Term("final hidden states + the scored ones", 2 * b * n * h * e, f"2·{b}·{n}·{h} × {e} B"),
        Term(f"vocabulary logits, {positions} positions at a time", positions * v * (e + upcast + 4),
             f"{positions}·{v} × ({e} + {upcast} + 4) B (logits, fp32, log-softmax)")])
    if kind == "perplexity":
        return nll
    if kind == "generation":
        total = n + s.max_new_tokens
        generation = [_kv_cache(shape, b, total, e, f"KV cache ({b} × {n} + {s.max_new_tokens} new tokens)"), forward,
                      Term("last position's logits (+ fp32 copies for sampling)", b * v * (e + 12),
                           f"{b}·{v} × ({e} + 12) B")]
        return widest(generation, nll)  # generation first, then the gold answers' perplexity
    # Label scoring: the batch's prompt cache, a copy of it extended by the labels' tokens, and the
    # widest of the prompt forward and the labels' forward with their logits.
    k = LABEL_TOKENS_PER_ROW
    caches = [_kv_cache(shape, b, n, e, f"prompt KV cache ({b} × {n})"),
              _kv_cache(shape, b, n + k, e, f"its copy with the labels' tokens ({b} × {n} + {k})")]
    labels = [_inference_layer_peak(shape, s, b, k, n + k, e),
              Term(f"labels' logits ({b} × {k} tokens, fp32 log-softmax)", b * k * v * (e + upcast + 4),
                   f"{b}·{k}·{v} × ({e} + {upcast} + 4) B")]
    return caches + widest([forward], labels)
