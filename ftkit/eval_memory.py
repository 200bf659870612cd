"""The evaluation's working memory, at its widest moment: the estimator's evaluation phase.

What ``ftkit.evaluator`` holds under ``inference_mode`` besides the weights (KV caches, one layer's
transient tensors, vocabulary logits where it makes them), for :func:`ftkit.estimator.estimate`.
``tests/test_estimator.py`` holds it to live tensor bytes measured on the CPU. Pure Python, no torch.
"""

from __future__ import annotations

from ftkit.activations import stream_bytes
from ftkit.estimator import (
    LABEL_SEARCH_COLUMNS,
    LABEL_SEARCH_QUERIES,
    LABEL_TOKENS_PER_ROW,
    NLL_POSITIONS,
    Settings,
    Term,
)
from ftkit.model_configs import ModelShape


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


def eval_terms(shape: ModelShape, s: Settings) -> list[Term]:
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
    e = stream_bytes(s)  # the weights' dtype, which evaluation computes in
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
    # Label scoring: the batch's prompt cache, a copy of it extended by the labels' tokens (a trie of
    # LABEL_TOKENS_PER_ROW, or the search's columns, up to LABEL_SEARCH_COLUMNS: the larger), and the
    # widest of the prompt forward, the labels' forward (a trie, or a search round over the longer
    # cache), and their logits (NLL_POSITIONS at a time after the labels' hidden states).
    k, c, q = LABEL_TOKENS_PER_ROW, max(LABEL_TOKENS_PER_ROW, LABEL_SEARCH_COLUMNS), LABEL_SEARCH_QUERIES
    caches = [_kv_cache(shape, b, n, e, f"prompt KV cache ({b} × {n})"),
              _kv_cache(shape, b, n + c, e, f"its copy with the labels' tokens ({b} × {n} + {c})")]
    positions = min(NLL_POSITIONS, b * k)
    logits = [Term(f"labels' hidden states ({b} × {k} tokens)", b * k * h * e, f"{b}·{k}·{h} × {e} B"),
              Term(f"their vocabulary logits, {positions} positions at a time", positions * v * (e + upcast + 4),
                   f"{positions}·{v} × ({e} + {upcast} + 4) B (logits, fp32, log-sum-exp)")]
    return caches + widest([forward], [_inference_layer_peak(shape, s, b, k, n + k, e)],
                           [_inference_layer_peak(shape, s, b, q, n + c, e)], logits)
