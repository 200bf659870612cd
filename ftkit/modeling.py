"""Finding, loading and adapting models: sources, heads, and the QLoRA / LoRA / full methods."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.errors import ModelError

if TYPE_CHECKING:
    from ftkit.recipe import Recipe

Echo = Any  # a callable(str) -> None


def resolve_model_path(recipe: Recipe, echo: Echo = print) -> Path:
    """The local folder holding ``model.id``: built in, a local path, or a (cached) hub download."""
    model = recipe.model
    if model.source == "builtin" and model.id == "ftkit/tiny-qwen2":
        from ftkit.tiny import tiny_model_path

        return tiny_model_path()
    if model.source == "builtin":
        from ftkit.gguf import builtin_gguf_file, gguf_model_path

        return gguf_model_path(builtin_gguf_file(model.id), model_id=model.id, echo=echo)
    if is_gguf_source(recipe):
        from ftkit.gguf import gguf_model_path

        return gguf_model_path(gguf_file_path(recipe), requested_dtype=model.dtype, echo=echo)
    if model.source == "local":
        path = Path(model.id).expanduser()
        if not path.is_absolute() and recipe.path is not None:
            path = (recipe.path.parent / path).resolve()
        if not (path / "config.json").is_file():
            raise ModelError(f"model.id: {path} is not a model folder (no config.json); check the path")
        return path
    revision = model.revision or None
    if model.source == "modelscope":
        from modelscope import snapshot_download

        # Offline, snapshot_download retries for ~22 s even when the model is cached; the cache
        # look-up first answers at once when it can.
        try:
            return Path(snapshot_download(model.id, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: fall through to the download
            pass
        echo(f"Downloading {model.id} from ModelScope ...")
        try:
            return Path(snapshot_download(model.id, revision=revision))
        except Exception as error:  # noqa: BLE001
            raise ModelError(
                f"model.id: could not download {model.id!r} from ModelScope ({type(error).__name__}); "
                "offline? download it on a connected machine and set model.source = \"local\" with its folder"
            ) from error
    from huggingface_hub import snapshot_download as hf_snapshot_download

    try:
        return Path(hf_snapshot_download(model.id, revision=revision))
    except Exception as error:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"model.id: {model.id!r} is not in the Hugging Face cache"
            + (" and HF_HUB_OFFLINE=1" if offline else f" and could not be downloaded ({type(error).__name__})")
            + "; download it first or set model.source = \"local\" with its folder"
        ) from error


def is_gguf_source(recipe: Recipe) -> bool:
    """Whether ``model.id`` names a GGUF file: ``source = "gguf"``, or a local path ending in ``.gguf``."""
    model = recipe.model
    return model.source == "gguf" or (model.source == "local" and model.id.lower().endswith(".gguf"))


def gguf_file_path(recipe: Recipe) -> Path:
    """The GGUF file ``model.id`` names, relative to the recipe file when not absolute."""
    path = Path(recipe.model.id).expanduser()
    if not path.is_absolute() and recipe.path is not None:
        path = (recipe.path.parent / path).resolve()
    return path


def load_tokenizer(path: Path, recipe: Recipe):  # noqa: ANN201 - a transformers tokenizer
    """The model's tokenizer, with a pad token (many causal LMs ship none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class LoadedModel:
    """The model ready to train, and what was decided on the way."""

    model: Any
    method: str  # what actually runs: qlora, lora or full
    dtype: str
    device: str
    notices: list[str]


def compute_dtype(recipe: Recipe):  # noqa: ANN201 - a torch.dtype
    """float32 on CPU (no fast bf16 there); bf16 on CUDA where supported, else fp16."""
    import torch

    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _keep_4bit_weights_trainable_on_cpu(model) -> None:  # noqa: ANN001
    """Stop bitsandbytes repacking 4-bit weights for CPU inference in a model that is trained.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a Linear4bit's weights into an
    inference-only layout the first time it runs in eval mode, and never back: training after the
    baseline evaluation then fails ("a view of a leaf Variable ... in-place operation"). The
    packed layout only speeds up inference, so a model ftkit trains keeps the plain layout.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(path: Path, recipe: Recipe, head: str, labels: list[str] | None, tokenizer) -> LoadedModel:  # noqa: ANN001
    """Load the base model with the right head, quantize it for QLoRA, and wrap it in LoRA."""
    import torch

    from ftkit.gguf import dequantized_notice

    notices: list[str] = [notice] if (notice := dequantized_notice(path)) else []
    dtype = compute_dtype(recipe)
    method = recipe.method.name
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": recipe.model.trust_remote_code}
    if head == "classifier":
        from transformers import AutoModelForSequenceClassification as auto_class

        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    else:
        from transformers import AutoModelForCausalLM as auto_class

    model = None
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        # The 4-bit weights are placed at load time and cannot be moved later: each rank's copy goes
        # to its own GPU (LOCAL_RANK, set by torchrun/accelerate), never all of them to GPU 0.
        from ftkit.distributed import local_rank

        try:
            model = auto_class.from_pretrained(path, quantization_config=quant,
                                               device_map={"": local_rank()} if cuda else None, **kwargs)
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=recipe.train.activation_checkpointing
            )
            if not cuda:
                _keep_4bit_weights_trainable_on_cpu(model)
                notices.append("QLoRA on CPU: bitsandbytes 4-bit NF4 runs here, but slowly; "
                               "compute in float32 (no fast bf16 on this CPU)")
        except Exception as error:  # noqa: BLE001 - bitsandbytes fails in many backend-specific ways
            notices.append(f"QLoRA unavailable here ({type(error).__name__}: {error}); "
                           "falling back to LoRA on unquantized weights")
            method, model = "lora", None
    if model is None:
        if cuda:
            # Straight onto this rank's GPU: the baseline evaluation runs before the Trainer (which
            # would move it) exists, and on the CPU it would take hours for a real model.
            from ftkit.distributed import local_rank

            kwargs["device_map"] = {"": local_rank()}
        try:
            model = auto_class.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelError(f"model.id: cannot load {path} as a {head} model: {error}") from error
    if head == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if method in ("lora", "qlora"):
        model = _add_lora(model, recipe, head)
    return LoadedModel(model=model, method=method, dtype=str(dtype).removeprefix("torch."),
                       device="cuda" if cuda else "cpu", notices=notices)


def _add_lora(model, recipe: Recipe, head: str):  # noqa: ANN001, ANN202
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets: Any = list(recipe.method.target_modules) or None
    if targets is None and model.config.model_type not in DEFAULTS:
        targets = "all-linear"  # an architecture peft has no default for: adapt every linear layer
    config = LoraConfig(
        r=recipe.method.r, lora_alpha=recipe.method.alpha, lora_dropout=recipe.method.dropout,
        target_modules=targets, task_type=TaskType.SEQ_CLS if head == "classifier" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ModelError(f"method.target_modules: {error}") from error


def count_parameters(model) -> tuple[int, int]:  # noqa: ANN001
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
