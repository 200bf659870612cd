"""What one training step saves for backward, term by term: the estimator's ``ftkit`` activation model.

Each function returns :class:`~ftkit.estimator.Term` s (bytes and the formula with the numbers
substituted) for :func:`ftkit.estimator.estimate`; the module docstring there says what is modelled,
and ``bench/estimator_accuracy.py`` measures it. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.estimator import DTYPE_BYTES, Settings, Term
from ftkit.model_configs import ModelShape


def stream_bytes(s: Settings) -> int:
    """Bytes per value of the residual stream: the weights' dtype (fp32 master weights for full
    fine-tuning, whose fp32 embedding output and residual adds stay fp32 under autocast)."""
    return 4 if s.method == "full" else DTYPE_BYTES[s.dtype]


def _compute_bytes(s: Settings) -> int:
    """Bytes per value of what the linear layers and attention return: 16 bit under autocast, else
    the weights' dtype."""
    return 2 if s.autocast else stream_bytes(s)


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


def layer_terms(shape: ModelShape, s: Settings, t: int, tokens: str, *, input_grad: bool = True) -> list[Term]:
    """What one decoder layer saves for backward as ftkit trains it, storage by storage.

    Follows the layer's data flow (transformers' Qwen2/Llama block, peft's LoRA layers, bitsandbytes'
    4-bit matmul) with each tensor's dtype and whether it needs a gradient, since an op saves what
    its backward needs only when one of its inputs does. ``input_grad`` is False for layer 0 under
    LoRA/QLoRA without checkpointing: its input, the frozen embedding's output, needs no gradient.
    """
    h, i, r = shape.hidden_size, shape.intermediate_size, s.lora_r
    q_width, kv_width, heads = shape.q_width, shape.kv_width, shape.num_heads
    full, amp = s.method == "full", s.autocast
    stream, compute = stream_bytes(s), _compute_bytes(s)
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


def first_layer_saving(shape: ModelShape, s: Settings, t: int, tokens: str) -> int:
    """What layer 0 saves less than the others under LoRA/QLoRA without checkpointing: its input (the
    frozen embedding's output) needs no gradient, so only the ops downstream of an adapter save."""
    if s.method == "full" or s.activation_checkpointing:
        return 0
    every = sum(term.bytes for term in layer_terms(shape, s, t, tokens))
    return every - sum(term.bytes for term in layer_terms(shape, s, t, tokens, input_grad=False))


def outside_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    """Saved outside the layers: rotary cos/sin, the final norm, the embedding's ids and the head's input."""
    h = shape.hidden_size
    stream = stream_bytes(s)
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


def logits_terms(shape: ModelShape, s: Settings, t: int, tokens: str) -> list[Term]:
    """The loss's saved tensors (fp32 log-softmax over the vocabulary, the labels) and the logits'
    transient memory at the start of the backward pass."""
    if s.head == "classifier":
        # The last token's logits are picked (two index tensors) and their log-softmax saved, in the
        # logits' dtype (autocast runs it in fp32), with the labels.
        n = s.num_labels
        e = 4 if s.autocast else stream_bytes(s)
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
