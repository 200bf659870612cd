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
:class:`Term` with its formula, so ``--explain`` can show the arithmetic. The activation terms are
in :mod:`ftkit.activations`, the evaluation phase's in :mod:`ftkit.eval_memory`.

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
DEVICES = ("cuda", "cpu")
#: What the evaluation runs (ftkit.evaluator): a classifier head's logits; label scoring with the LM
#: head (prompt KV cache + the labels' tokens); generation (KV cache to max_new_tokens) followed by
#: the gold answers' perplexity; perplexity alone; or nothing. auto: classifier for a classifier
#: head, else generation.
EVAL_KINDS = ("auto", "classifier", "labels", "generation", "perplexity", "none")
#: Label tokens (trie nodes) label scoring runs in one row after a prompt (ftkit.evaluator.ANSWER_TOKENS_PER_FORWARD).
LABEL_TOKENS_PER_ROW = 64
#: The label search's bounds (ftkit.evaluator.SEARCH_COLUMNS, SEARCH_PREFIXES_PER_ROUND): columns a
#: prompt's KV cache holds after the prompt, and columns run in one round.
LABEL_SEARCH_COLUMNS = 256
LABEL_SEARCH_QUERIES = 32
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
                                     ("eval_kind", self.eval_kind, EVAL_KINDS), ("device", self.device, DEVICES)):
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
    from ftkit import activations, eval_memory  # they build on Settings and Term

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
        layer_terms = activations.layer_terms(shape, s, t, tokens)
        per = sum(term.bytes for term in layer_terms)
        other = activations.outside_terms(shape, s, t, tokens)
        if s.activation_checkpointing:
            # Non-reentrant checkpointing (the Trainer's) keeps each layer's input, in the residual
            # stream's dtype (fp32 for full fine-tuning), and the backward pass recomputes one layer
            # at a time. The embedding's output needs a gradient then, so layer 0 is like the others.
            stream = activations.stream_bytes(s)
            kept = t * shape.hidden_size * stream
            all_layers = Term("activations, all layers (checkpointed)", layers * kept + per,
                              f"{layers} layer inputs × {tokens}·{shape.hidden_size} × {stream} B + one recomputed "
                              f"layer {per:,} B")
        else:
            first = activations.first_layer_saving(shape, s, t, tokens)
            less = f" − {first:,} B (layer 0 saves less: its input, the frozen embedding's output, needs no gradient)"
            all_layers = Term("activations, all layers", layers * per - first,
                              f"{layers} × {per:,} B" + (less if first else ""))
    logits = activations.logits_terms(shape, s, t, tokens)

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
    evaluation = eval_memory.eval_terms(shape, s)
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
