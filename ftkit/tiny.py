"""A built-in tiny Qwen2-architecture model, made locally: ftkit's offline default.

``ftkit/tiny-qwen2`` (recipe ``model.source = "builtin"``) lets the whole pipeline run on a CPU
with no network in minutes. Its weights are random (seed 0) and its byte-level BPE tokenizer is
trained on the bundled emotion dataset, so it knows no language: a fine-tuned copy beating it on
the held-out split shows the pipeline works, not that the model is useful.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

#: The model id recipes use for the built-in model (with ``model.source = "builtin"``).
TINY_MODEL_ID = "ftkit/tiny-qwen2"
#: Bump when anything below changes what gets built: it names the cache folder, so old builds are ignored.
TINY_MODEL_VERSION = "v1"
#: Written last into a build; a folder without it is not a complete build.
MANIFEST_NAME = "ftkit-tiny.json"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen2's chat format without its default English system prompt (it would cost every example ~10
#: tokens). ``{% generation %}`` marks assistant replies so ``return_assistant_tokens_mask`` works.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: Qwen2's pre-tokenizer pattern (as in transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_VOCAB_SIZE = 3000

# Sizes: every Linear has in/out features that are multiples of 64 (head_dim 32, 2 KV heads ->
# k/v_proj out 64), so bitsandbytes NF4 (blocksize 64) quantizes each without padding.
MODEL_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

def build_tiny_model(dest: Path) -> Path:
    """Write the tiny model (config, safetensors weights, tokenizer, chat template) to ``dest``.

    ``dest`` must not exist or be empty. The same library versions always write the same bytes.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; build the tiny model into a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(dest)
    _save_model(dest, tokenizer)
    _write_manifest(dest)
    return dest


def tiny_model_path() -> Path:
    """The cached tiny model folder, built on first use (under ``$FTKIT_CACHE`` or ``~/.cache/ftkit``)."""
    return build_cached(tiny_cache_root() / f"tiny-qwen2-{TINY_MODEL_VERSION}", build_tiny_model, MANIFEST_NAME)


def build_cached(final: Path, build: Callable[[Path], object], manifest_name: str) -> Path:
    """``final``, built by ``build(folder)`` unless a complete build (one with ``manifest_name``) is there.

    ``build`` must write ``manifest_name`` last into the empty folder it is given.
    """
    if (final / manifest_name).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder (same filesystem) and rename into place: the rename is atomic,
    # so a crash leaves only a temp folder, and of two concurrent builders one wins, the other
    # discards its identical copy.
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(staging)
        # mkdtemp makes the folder owner-only; a shared $FTKIT_CACHE should be readable by all.
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if final.exists() and not (final / manifest_name).is_file():
            # Not a build of ours (no manifest): move it aside rather than load it.
            shutil.rmtree(final.rename(final.with_name(f"{staging.name}-stale")), ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / manifest_name).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def tiny_cache_root() -> Path:
    """Where ftkit caches what it builds: ``$FTKIT_CACHE``, else ``~/.cache/ftkit``."""
    configured = os.environ.get("FTKIT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ftkit"


def tokenizer_corpus() -> list[str]:
    """The text the tokenizer is trained on: sentences of the kind the quickstart uses, and filler.

    ``tiny_tokenizer_corpus.txt`` holds the sentences, labels and triggers of the emotion plugin's
    sample data, one per line: the tokenizer is the tiny model's own asset, so core keeps this
    copy rather than reading a plugin's data.
    """
    corpus = resources.files("ftkit.assets").joinpath("tiny_tokenizer_corpus.txt").read_text(encoding="utf-8")
    texts = [line for line in corpus.splitlines() if line]
    # Filler: chat roles, prompts and other tasks' kind of text (English, Simplified Chinese) should
    # tokenize compactly too, not byte by byte.
    filler = resources.files("ftkit.assets").joinpath("tiny_tokenizer_filler.txt").read_text(encoding="utf-8")
    return texts + [line for line in filler.splitlines() if line.strip()]


def _save_tokenizer(dest: Path):  # noqa: ANN202 - a transformers tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    # Training only: Han characters are split off one by one before Qwen2's pattern. On a few
    # hundred sentences BPE would otherwise learn whole phrases ("被網友惡意造謠") as tokens and cut
    # any new sentence badly. No merge then spans two Han characters, so the saved tokenizer, with
    # Qwen2's own pre-tokenizer, cuts Chinese into one token per known character.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(tokenizer_corpus(), trainer)
    trained = json.loads(backend.to_str())["model"]
    endoftext, im_start, im_end = SPECIAL_TOKENS
    # Qwen2Tokenizer itself, so AutoTokenizer (which picks it for model_type qwen2) rebuilds exactly
    # this tokenizer. As Qwen2-Instruct: a turn ends with <|im_end|> (eos), pad is <|endoftext|>, no bos.
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"], merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None, bos_token=None, eos_token=im_end, pad_token=endoftext,
        extra_special_tokens=[im_start], chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SIZES["max_position_embeddings"], padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(dest)
    return tokenizer


def _save_model(dest: Path, tokenizer) -> None:  # noqa: ANN001
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    endoftext, _, im_end = (tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS)
    config = Qwen2Config(
        **MODEL_SIZES,
        vocab_size=-(-len(tokenizer) // 64) * 64,  # padded like Qwen's own vocabularies
        tie_word_embeddings=True,
        bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_cache=True, dtype="float32",
    )
    # Seed inside a forked RNG so building never changes the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    save_quietly(model, dest)


def save_quietly(model, dest: Path) -> None:  # noqa: ANN001 - a transformers model
    """``model.save_pretrained(dest)`` without its progress bar.

    A one-shard "Writing model shards" bar is noise in the middle of ftkit's own output.
    """
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(dest)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _write_manifest(dest: Path) -> None:
    files = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(dest.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = {"id": TINY_MODEL_ID, "version": TINY_MODEL_VERSION, "sha256": files}
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
