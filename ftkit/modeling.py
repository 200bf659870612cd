"""Finding, loading and adapting models: sources, heads, and the QLoRA / LoRA / full methods."""

from __future__ import annotations

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
        path = model_id_path(recipe)
        if not (path / "config.json").is_file():
            raise ModelError(f"model.id: {path} is not a model folder (no config.json); check the path")
        return path
    if model.source == "modelscope":
        return _modelscope_model_path(model.id, model.revision or None, echo)
    return _huggingface_model_path(model.id, model.revision or None, echo)


def _modelscope_model_path(model_id: str, revision: str | None, echo: Echo) -> Path:
    """The cached folder, else a download; offline, a one-line error within seconds, and nothing left behind."""
    from ftkit import hub

    cached = hub.modelscope_cached_model(model_id, revision)
    if cached is not None:
        return cached
    offline_hint = "offline? download it on a connected machine and set model.source = \"local\" with its folder"
    why = hub.unreachable(hub.modelscope_endpoint())
    if why:
        raise ModelError(f"model.id: {model_id!r} is not in the ModelScope cache and {why}; {offline_hint}")
    from modelscope import snapshot_download

    hub.quiet_modelscope()
    echo(f"Downloading {model_id} from ModelScope ...")
    name = model_id.rpartition("/")[2]
    try:
        with (hub.removed_on_failure(hub.modelscope_cache_root(), (name, name.replace(".", "___"))),
              hub.removed_on_failure(hub.modelscope_config_dir())):  # its session file, first contact
            return Path(snapshot_download(model_id, revision=revision))
    except Exception as error:  # noqa: BLE001 - the hub client raises many unrelated types
        raise ModelError(f"model.id: could not download {model_id!r} from ModelScope ({type(error).__name__}); "
                         f"{offline_hint}") from error


def _huggingface_model_path(model_id: str, revision: str | None, echo: Echo) -> Path:
    """The hub's current snapshot (the cached one when the hub cannot be reached); one-line errors."""
    from huggingface_hub import constants, snapshot_download

    from ftkit import hub

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub.unreachable(constants.ENDPOINT)
    try:
        with hub.removed_on_failure(hub.huggingface_cache_root(), (f"models--{model_id.replace('/', '--')}",)):
            return Path(snapshot_download(model_id, revision=revision, local_files_only=bool(why)))
    except Exception as error:  # noqa: BLE001 - the hub client raises many unrelated types
        raise ModelError(
            f"model.id: {model_id!r} is not in the Hugging Face cache and "
            + (why or f"could not be downloaded ({type(error).__name__})")
            + "; download it first or set model.source = \"local\" with its folder"
        ) from error


def model_location(recipe: Recipe) -> str:
    """Where ``model.id`` is: built in, local, already in a hub cache, or still to download.

    Reads the file system only (no network, no torch or hub client), for `validate` and `--dry-run`.
    """
    from ftkit import hub

    model = recipe.model
    if model.source == "builtin" and model.id == "ftkit/tiny-qwen2":
        return "built in (generated into ftkit's cache on first use, no download)"
    if model.source == "builtin":
        from ftkit.gguf import builtin_gguf_file

        try:
            return f"built in (GGUF file {builtin_gguf_file(model.id)}, no download)"
        except ModelError as error:
            return f"built in, but not installed: {error.message.removeprefix('model.id: ')}"
    if is_gguf_source(recipe):
        path = gguf_file_path(recipe)
        return f"local GGUF file {path}" if path.is_file() else f"missing: no GGUF file at {path}"
    if model.source == "local":
        path = model_id_path(recipe)
        return f"local folder {path}" if (path / "config.json").is_file() else f"missing: no config.json in {path}"
    revision = model.revision or None
    if model.source == "modelscope":
        cached = hub.modelscope_cached_model(model.id, revision)
        missing = f"needs a download from ModelScope (not in its cache {hub.modelscope_cache_root()})"
    else:
        cached = hub.huggingface_cached_model(model.id, revision)
        missing = f"needs a download from the Hugging Face hub (not in its cache {hub.huggingface_cache_root()})"
    return f"cached: {cached}" if cached is not None else missing


def is_gguf_source(recipe: Recipe) -> bool:
    """Whether ``model.id`` names a GGUF file: ``source = "gguf"``, or a local path ending in ``.gguf``."""
    model = recipe.model
    return model.source == "gguf" or (model.source == "local" and model.id.lower().endswith(".gguf"))


def gguf_file_path(recipe: Recipe) -> Path:
    """The GGUF file ``model.id`` names, relative to the recipe file when not absolute."""
    return model_id_path(recipe)


def model_id_path(recipe: Recipe) -> Path:
    """The local path ``model.id`` names (a folder or a GGUF file), relative to the recipe file when not absolute."""
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
    dtype: str  # the compute dtype
    device: str
    notices: list[str]
    #: The Trainer's mixed precision ("bf16", "fp16") or None: full fine-tuning keeps fp32 master
    #: weights and computes in 16 bit under autocast; fp16 LoRA needs AMP's loss scaling.
    amp: str | None = None


#: How QLoRA stores the base weights: bitsandbytes' NF4 with double quantization, as the QLoRA
#: paper trains. ftkit.estimator.NF4_BYTES_PER_PARAM counts the bytes of exactly this.
QUANT_TYPE, DOUBLE_QUANT = "nf4", True


def quantization_config(dtype):  # noqa: ANN001, ANN201 - a torch.dtype -> a transformers.BitsAndBytesConfig
    """The one 4-bit config ftkit builds: training, reloading a run, and the memory benches."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE,
                              bnb_4bit_use_double_quant=DOUBLE_QUANT, bnb_4bit_compute_dtype=dtype)


def compute_dtype(recipe: Recipe):  # noqa: ANN201 - a torch.dtype
    """float32 on CPU (no fast bf16 there); bf16 on CUDA where supported, else fp16."""
    import torch

    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def weights_dtype(method: str, compute):  # noqa: ANN001, ANN201 - a torch.dtype -> a torch.dtype
    """The dtype the weights are loaded in for ``method`` with compute dtype ``compute``.

    Full fine-tuning keeps fp32 master weights: an AdamW update of a bf16 weight smaller than half
    its spacing (2^-8 relative) rounds away, so small learning rates would lose most updates. The
    16-bit compute comes from autocast (the Trainer's ``bf16``/``fp16``), as mixed precision does.
    LoRA and QLoRA keep the frozen base in the compute dtype; their adapters are fp32 (peft).
    """
    import torch

    return torch.float32 if method == "full" else compute


def mixed_precision(method: str, compute, cuda: bool) -> str | None:  # noqa: ANN001
    """The Trainer's mixed-precision flag for ``method`` at compute dtype ``compute`` (see LoadedModel.amp)."""
    import torch

    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute)
    if method == "full":
        return half
    return "fp16" if half == "fp16" and cuda else None


def prepare_4bit_for_training(model, checkpointing: bool):  # noqa: ANN001, ANN201
    """A 4-bit model ready for LoRA training: frozen, computing in its 16-bit dtype.

    What peft's ``prepare_model_for_kbit_training`` does, except its cast of every non-4-bit
    parameter (embeddings, norms, the LM head) to fp32: with fp32 norms and embeddings the residual
    stream and every activation saved for backward became fp32, so QLoRA needed more memory than
    LoRA at the same settings. QLoRA as its paper trains it computes in bf16 with 4-bit weights and
    fp32 adapters; RMSNorm still computes its statistics in fp32 inside the layer (Qwen2, Llama).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:
        model.enable_input_require_grads()  # the frozen embedding's output must carry a gradient
        model.activation_checkpointing_enable()
    return model


def keep_4bit_weights_trainable_on_cpu(model) -> None:  # noqa: ANN001
    """Stop bitsandbytes repacking 4-bit weights for CPU inference in a model that is trained.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a Linear4bit's weights into an
    inference-only layout the first time it runs in eval mode, and never back: training after the
    baseline evaluation then fails ("a view of a leaf Variable ... in-place operation"). The
    packed layout only speeds up inference, so a model ftkit trains keeps the plain layout, and a
    finished QLoRA run is loaded with it too (``use.load_model``): the packed kernel rounds
    differently, and ``ftkit eval`` must reproduce the run's metrics.json exactly.
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
    kwargs: dict[str, Any] = {"dtype": weights_dtype(method, dtype), "trust_remote_code": recipe.model.trust_remote_code}
    if head == "classifier":
        from transformers import AutoModelForSequenceClassification as auto_class

        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    else:
        from transformers import AutoModelForCausalLM as auto_class

    model = None
    if method == "qlora":
        quant = quantization_config(dtype)
        # The 4-bit weights are placed at load time and cannot be moved later: each rank's copy goes
        # to its own GPU (LOCAL_RANK, set by torchrun/accelerate), never all of them to GPU 0.
        from ftkit.distributed import local_rank

        try:
            model = auto_class.from_pretrained(path, quantization_config=quant,
                                               device_map={"": local_rank()} if cuda else None, **kwargs)
            model = prepare_4bit_for_training(model, recipe.train.activation_checkpointing)
            if not cuda:
                keep_4bit_weights_trainable_on_cpu(model)
                notices.append("QLoRA on CPU: bitsandbytes 4-bit NF4 runs here, but slowly; compute in "
                               f"{str(dtype).removeprefix('torch.')}"
                               + (" (no fast bf16 on this CPU)" if dtype == torch.float32 else ""))
        except Exception as error:  # noqa: BLE001 - bitsandbytes fails in many backend-specific ways
            if cuda:  # another method would be another memory use than the one checked: say so, not fall back
                raise ModelError(f"method.name = \"qlora\": 4-bit loading failed on CUDA ({type(error).__name__}: "
                                 f"{error}); check that bitsandbytes matches this CUDA (`python -m bitsandbytes`), "
                                 "or set method.name = \"lora\"") from error
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
    amp = mixed_precision(method, dtype, cuda)
    if method == "full" and amp:
        notices.append(f"full fine-tuning: fp32 master weights, {str(dtype).removeprefix('torch.')} compute "
                       "(mixed precision)")
    return LoadedModel(model=model, method=method, dtype=str(dtype).removeprefix("torch."),
                       device="cuda" if cuda else "cpu", notices=notices, amp=amp)


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
