"""Model shapes for the estimator: a built-in table, local config.json files and cached hub configs.

Pure Python (no torch, no transformers): ``ftkit estimate`` must answer instantly. A shape is what
memory depends on, nothing more. The table holds the exact values of each model's published
``config.json``; Qwen2.5 base and Instruct models share their shapes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ftkit.errors import UsageError

#: ``--model`` size shorthands: the Qwen2.5 family, smallest first.
SIZES = ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")

#: Decoder architectures the estimator models (a Llama-style block: RMSNorm, GQA attention with
#: rotary embeddings, SwiGLU MLP). Qwen2 differs only by its q/k/v biases.
SUPPORTED_TYPES = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int = 0  # 0: hidden_size // num_heads
    model_type: str = "qwen2"
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block, by module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear layers in one block (what QLoRA quantizes)."""
        return sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())

    @property
    def layer_other_params(self) -> int:
        """Per-block parameters outside the linear weights: two RMSNorms and the q/k/v biases."""
        bias = self.q_width + 2 * self.kv_width if self.qkv_bias else 0
        return 2 * self.hidden_size + bias

    @property
    def embedding_params(self) -> int:
        """Input embedding, plus the output projection when it is not tied to it."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def num_params(self) -> int:
        per_layer = self.layer_linear_params + self.layer_other_params
        return self.num_layers * per_layer + self.embedding_params + self.hidden_size


def _qwen25(name: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, tie: bool) -> ModelShape:
    return ModelShape(name, h, i, layers, heads, kv, vocab, tie)


#: Exact shapes from the models' config.json files.
KNOWN_MODELS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        _qwen25("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True),
        _qwen25("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True),
        _qwen25("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, True),
        _qwen25("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False),
        _qwen25("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False),
        _qwen25("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False),
        _qwen25("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, False),
        # Qwen1.5: multi-head attention (as many KV heads as query heads).
        _qwen25("Qwen/Qwen1.5-0.5B", 1024, 2816, 24, 16, 16, 151936, True),
        _qwen25("Qwen/Qwen1.5-1.8B", 2048, 5504, 24, 16, 16, 151936, False),
        _qwen25("Qwen/Qwen1.5-4B", 2560, 6912, 40, 20, 20, 151936, False),
        _qwen25("Qwen/Qwen1.5-7B", 4096, 11008, 32, 32, 32, 151936, False),
        _qwen25("Qwen/Qwen1.5-14B", 5120, 13696, 40, 40, 40, 152064, False),
        ModelShape("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True, 64, "llama", False),
        ModelShape("meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True, 128, "llama", False),
        ModelShape("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, 128, "llama", False),
        ModelShape("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 2048, 5632, 22, 32, 4, 32000, False, 64, "llama", False),
        ModelShape("mistralai/Mistral-7B-v0.1", 4096, 14336, 32, 32, 8, 32000, False, 128, "mistral", False),
    )
}
# Instruct / chat variants have the same shapes as their base models.
for _name, _shape in list(KNOWN_MODELS.items()):
    if _name.startswith(("Qwen/Qwen2.5-", "meta-llama/Llama-3.2-")):
        KNOWN_MODELS[f"{_name}-Instruct"] = replace(_shape, name=f"{_name}-Instruct")
    elif _name.startswith("Qwen/Qwen1.5-"):
        KNOWN_MODELS[f"{_name}-Chat"] = replace(_shape, name=f"{_name}-Chat")
KNOWN_MODELS["meta-llama/Llama-3.1-8B-Instruct"] = replace(
    KNOWN_MODELS["meta-llama/Llama-3.1-8B"], name="meta-llama/Llama-3.1-8B-Instruct")
KNOWN_MODELS["mistralai/Mistral-7B-Instruct-v0.2"] = replace(
    KNOWN_MODELS["mistralai/Mistral-7B-v0.1"], name="mistralai/Mistral-7B-Instruct-v0.2")


def resolve_shape(spec: str) -> ModelShape:
    """A shape from a size shorthand, a known id, a local folder or config.json, or a cached hub id.

    Never touches the network: a hub id not in the table must already be in the local Hugging Face
    or ModelScope cache.
    """
    spec = spec.strip()
    if not spec:
        raise UsageError("--model: empty; give a size (0.5B … 72B), a model id, or a local model folder")
    size = spec.upper()
    if size in SIZES:
        return KNOWN_MODELS[f"Qwen/Qwen2.5-{size}"]
    lowered = {name.lower(): shape for name, shape in KNOWN_MODELS.items()}
    if spec.lower() in lowered:
        return lowered[spec.lower()]
    path = Path(spec).expanduser()
    if path.exists():
        config = path / "config.json" if path.is_dir() else path
        if not config.is_file():
            raise UsageError(f"--model: {path} has no config.json; point at a model folder or its config.json")
        return shape_from_config(config)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        cached = cached_config(spec)
        if cached is not None:
            return shape_from_config(cached, name=spec)
    suggestion = difflib.get_close_matches(spec, [*SIZES, *KNOWN_MODELS], n=1, cutoff=0.6)
    hint = f"did you mean {suggestion[0]}? " if suggestion else ""
    raise UsageError(
        f"--model: unknown model {spec!r}; {hint}give a size ({', '.join(SIZES)}), a known id "
        "(`ftkit estimate --list-models`), a local model folder or config.json, or a hub id already downloaded"
    )


def shape_from_config(config: Path, *, name: str | None = None) -> ModelShape:
    """Read a Hugging Face ``config.json`` of a supported decoder."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{config}: not a readable config.json ({error})") from error
    if not isinstance(data, dict):
        raise UsageError(f"{config}: not a model config (expected a JSON object)")
    data = data.get("text_config", data)  # multimodal wrappers keep the decoder's config inside
    model_type = data.get("model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise UsageError(
            f"{config}: model_type {model_type!r} is not modelled; the estimator covers Llama-style decoders "
            f"({', '.join(SUPPORTED_TYPES)})"
        )
    try:
        heads = int(data["num_attention_heads"])
        return ModelShape(
            name=name or str(config.parent if config.name == "config.json" else config),
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            num_layers=int(data["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(data.get("num_key_value_heads") or heads),
            vocab_size=int(data["vocab_size"]),
            tie_embeddings=bool(data.get("tie_word_embeddings", model_type != "qwen2")),
            head_dim=int(data.get("head_dim") or 0),
            model_type=model_type,
            qkv_bias=model_type == "qwen2" or bool(data.get("attention_bias", False)),
        )
    except KeyError as error:
        raise UsageError(f"{config}: missing {error.args[0]!r}; is this a decoder model's config.json?") from error
    except (TypeError, ValueError) as error:
        raise UsageError(f"{config}: a size field is not a number ({error})") from error


def cached_config(model_id: str) -> Path | None:
    """The config.json of ``model_id`` in the local Hugging Face or ModelScope cache, if there.

    The same folders ``ftkit run`` would load offline (:mod:`ftkit.hub`'s look-ups, from disk only).
    """
    from ftkit.hub import huggingface_cached_model, modelscope_cached_model

    folder = huggingface_cached_model(model_id) or modelscope_cached_model(model_id)
    return folder / "config.json" if folder is not None else None
