"""Training-memory estimator: will this run fit my card?

Pure Python (no torch): ``ftkit estimate`` answers in milliseconds. Two activation models:

* ``megatron``: Korthikanti et al. 2022 (arXiv:2205.05198) §4, exactly as published:
  ``s·b·h·(34 + 5·a·s/h)`` bytes per layer. Already bytes (16-bit tensors and 1-byte dropout masks);
  for Qwen2.5-1.5B at s=256, b=4 that is 69.2 MB per layer, 1.94 GB over 28 layers.
* ``ftkit`` (default): the tensors a Qwen2/Llama block really saves for backward as ftkit trains it
  (transformers 5.x, peft, bitsandbytes), counted tensor by tensor: RMSNorm's fp32 copy, GQA K/V,
  the SwiGLU width, SDPA (no s×s matrix) or eager attention (fp32 softmax), peft's fp32 copy of
  each adapted module's input, LoRA dropout, activation checkpointing, and the logits/loss term. ``bench/estimator_accuracy.py`` checks it against exact measurements.

The estimate follows how ftkit trains (``ftkit.modeling``): LoRA and QLoRA run the 16-bit base in its
own dtype without autocast (adapters fp32, as peft keeps them; QLoRA's embeddings and norms stay
16-bit, so its activations are LoRA's and it saves the weight bytes); full fine-tuning keeps fp32
master weights, gradients and AdamW states and computes in 16 bit under autocast. Every term is a :class:`Term` with its
formula, so ``--explain`` can show the arithmetic.

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
    device: str = "cuda"  # "cpu" only to compare with CPU measurements (dropout masks are fp32 there)
    formula: str = "ftkit"
    gpus: int = 1  # data-parallel processes (DDP), one device each

    def __post_init__(self) -> None:
        for name, value in (("seq", self.seq), ("batch", self.batch), ("lora_r", self.lora_r),
                            ("grad_accum", self.grad_accum), ("num_labels", self.num_labels), ("gpus", self.gpus)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not a positive whole number")
        for name, value, allowed in (("method", self.method, METHODS), ("dtype", self.dtype, tuple(DTYPE_BYTES)),
                                     ("optim", self.optim, OPTIMIZERS), ("attn", self.attn, ATTENTION),
                                     ("head", self.head, HEADS), ("formula", self.formula, FORMULAS)):
            if value not in allowed:
                raise UsageError(f"--{name}: {value!r} is not one of {', '.join(allowed)}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout: {self.lora_dropout} is not in [0, 1)")
        unknown = [m for m in self.target_modules if m not in ALL_LINEAR]
        if unknown or not self.target_modules:
            raise UsageError(f"--target-modules: {', '.join(unknown) or 'none given'}; choose from "
                             f"{', '.join(ALL_LINEAR)} or all-linear")

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
                "overhead": terms(self.overhead),
            },
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
        cast = shape.layer_linear_params * layers + (0 if s.head == "classifier" else shape.vocab_size * shape.hidden_size)
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
        stream = w
        if s.activation_checkpointing:
            kept = t * shape.hidden_size * stream
            all_layers = Term("activations, all layers (checkpointed)", layers * kept + per,
                              f"{layers} layer inputs × {tokens}·{shape.hidden_size}·{stream} B + one recomputed "
                              f"layer {per:,} B")
        else:
            first = _first_layer_saving(shape, s, t)
            all_layers = Term("activations, all layers", layers * per - first,
                              f"{layers} × {per:,} B" + (f" − {first:,} B (less in layer 0: its input needs no gradient)"
                                                         if first else ""))
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
    overhead = [Term("allocator slack", round(dynamic * ALLOCATOR_SLACK), f"{ALLOCATOR_SLACK:.0%} of the "
                     f"{dynamic:,} B that come and go")]
    if s.device == "cuda":
        overhead.append(Term("CUDA context", CUDA_CONTEXT_BYTES, "cuBLAS/cuDNN handles and kernels (typical)"))
    if s.gpus > 1:
        # DDP copies gradients into flat buckets to all-reduce them; the buckets live as long as
        # the model, so they add to every phase of the step.
        overhead.append(Term("DDP gradient buckets", trainable * grad_bytes,
                             f"{trainable:,} trainable × {grad_bytes} B (all-reduce buffers, on each of "
                             f"{s.gpus} devices)"))
    total = phases[peak_phase] + sum(x.bytes for x in overhead)
    return Estimate(
        shape=shape, settings=s, params_total=total_params, params_trainable=trainable, weights=weights,
        gradients=gradients, optimizer=optimizer, activation_layer=layer_terms, activation_layers=all_layers,
        activation_other=other, logits=logits, overhead=overhead, peak_phase=peak_phase, total=total, notes=notes,
    )


def _layer_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    """What one decoder layer saves for backward (a layer whose input needs a gradient)."""
    h, i, r = shape.hidden_size, shape.intermediate_size, s.lora_r
    w = DTYPE_BYTES[s.dtype]
    full = s.method == "full"
    # bitsandbytes returns each 4-bit matmul in its input's dtype: QLoRA's stream is the compute dtype.
    act = w
    targets = set(s.target_modules) if not full else set()
    mask = 1 if s.device == "cuda" else 4  # dropout mask: bool on CUDA, float on CPU
    terms: list[Term] = []

    def add(name: str, count: int, width: str, nbytes: int | float) -> None:
        if count:
            terms.append(Term(name, round(count * nbytes), f"{tokens}·{width} × {nbytes} B"))

    for norm in ("input_layernorm", "post_attention_layernorm"):
        add(f"{norm}: fp32 input", t * h, f"{h}", 4)
        add(f"{norm}: rsqrt", t, "1", 4)
        if full:
            add(f"{norm}: normalized (weight grad)", t * h, f"{h}", w)

    def lora_inputs(group: tuple[str, ...], width: int, label: str, *, fp32_input_kept: bool = False) -> None:
        chosen = [m for m in group if m in targets]
        if not chosen:
            return
        if s.lora_dropout > 0:
            # Each adapted module drops out its own copy and keeps the mask and the dropped input.
            add(f"{label} LoRA dropout masks ({len(chosen)})", len(chosen) * t * width, f"{width}", mask)
            add(f"{label} LoRA A inputs, dropped, fp32 ({len(chosen)})", len(chosen) * t * width, f"{width}", 4)
        elif act == 4:
            # The input is fp32 already: the adapters share it (nothing new if something else keeps it).
            if not fp32_input_kept:
                add(f"{label} LoRA A input, fp32 (shared)", t * width, f"{width}", 4)
        else:
            # peft casts the input to the fp32 adapter dtype: one copy per adapted module.
            add(f"{label} LoRA A inputs, fp32 copies ({len(chosen)})", len(chosen) * t * width, f"{width}", 4)
        add(f"{label} LoRA B inputs, fp32 ({len(chosen)})", len(chosen) * t * r, f"{r}", 4)

    q, kv = shape.q_width, shape.kv_width
    if full:
        add("q/k/v input (weight grads)", t * h, f"{h}", w)
    lora_inputs(("q_proj", "k_proj", "v_proj"), h, "q/k/v")
    kv_saved = q if s.padded or s.attn == "eager" else kv  # repeat_kv unless SDPA runs GQA natively
    heads = shape.num_heads
    if s.attn == "sdpa":
        add("SDPA: q", t * q, f"{q}", act)
        add("SDPA: k, v" + (" (repeated to all heads)" if kv_saved == q else ""), 2 * t * kv_saved,
            f"{kv_saved}·2", act)
        add("SDPA: output", t * q, f"{q}", act)
        add("SDPA: logsumexp (fp32)", t * heads, f"{heads}", 4)
        if s.padded:
            # The padding mask, turned into an additive mask in q's dtype for each layer's call.
            terms.append(Term("SDPA: additive padding mask", s.batch * s.seq * s.seq * act,
                              f"{s.batch}·{s.seq}² × {act} B"))
        o_input_new = False  # o_proj's input is SDPA's output, already kept
    else:
        add("eager: q, k (repeated), v (repeated)", 3 * t * q, f"{q}·3", act)
        scores = s.batch * heads * s.seq * s.seq
        terms.append(Term("eager: softmax (fp32)", scores * 4, f"{s.batch}·{heads}·{s.seq}² × 4 B"))
        if act != 4:
            terms.append(Term(f"eager: probabilities ({s.dtype})", scores * act,
                              f"{s.batch}·{heads}·{s.seq}² × {act} B"))
        o_input_new = True
    if full and o_input_new:
        add("o_proj input (weight grad)", t * q, f"{q}", act)
    lora_inputs(("o_proj",), q, "o", fp32_input_kept=not o_input_new)
    if full:
        add("gate/up input (weight grads)", t * h, f"{h}", w)
    lora_inputs(("gate_proj", "up_proj"), h, "gate/up")
    add("MLP: gate, act(gate), up", 3 * t * i, f"{i}·3", act)
    if full:
        add("down_proj input (weight grad)", t * i, f"{i}", act)
    lora_inputs(("down_proj",), i, "down")
    return terms


def _first_layer_saving(shape: ModelShape, s: Settings, t: int) -> int:
    """What layer 0 does not save under LoRA without checkpointing: its input (frozen embeddings)
    needs no gradient, so its first RMSNorm and q/k/v dropout masks are not kept, and eager attention
    keeps no q when k needs no gradient."""
    if s.method == "full":
        return 0
    saving = t * shape.hidden_size * 4 + t * 4
    if s.lora_dropout > 0:
        qkv_targets = sum(m in s.target_modules for m in ("q_proj", "k_proj", "v_proj"))
        saving += qkv_targets * t * shape.hidden_size * (1 if s.device == "cuda" else 4)
    if s.attn == "eager" and "k_proj" not in s.target_modules:
        saving += t * shape.q_width * DTYPE_BYTES[s.dtype]
    return saving


def _outside_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    h = shape.hidden_size
    w = DTYPE_BYTES[s.dtype]
    act = w
    terms = [
        Term("rotary cos/sin", 2 * s.seq * shape.head_dim * act, f"2·{s.seq}·{shape.head_dim} × {act} B"),
        Term("final norm: fp32 input + rsqrt", t * h * 4 + t * 4, f"{tokens}·({h}·4 + 4) B"),
    ]
    if s.method == "full":
        terms.append(Term("embedding: token ids", t * 8, f"{tokens} × 8 B"))
        terms.append(Term("final norm: normalized (weight grad)", t * h * w, f"{tokens}·{h} × {w} B"))
    if s.head == "classifier":
        terms.append(Term("score head input", t * h * act, f"{tokens}·{h} × {act} B"))
    elif s.method == "full":
        terms.append(Term("lm_head input (weight grad)", t * h * w, f"{tokens}·{h} × {w} B"))
    return terms


def _logits_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    if s.head == "classifier":
        n = s.num_labels
        return [Term("classifier logits + loss", s.batch * n * 4 + 2 * s.batch * 8 + 4,
                     f"{s.batch}·{n} × 4 B + indices")]
    v = shape.vocab_size
    logit_dtype = DTYPE_BYTES[s.dtype]
    terms = [
        Term("log-softmax (fp32, saved)", t * v * 4, f"{tokens}·{v} × 4 B"),
        Term("labels (int64, saved)", t * 8 + 4, f"{tokens} × 8 B"),
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
