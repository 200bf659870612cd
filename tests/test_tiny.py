"""The built-in tiny Qwen2 model: built locally, deterministic, loadable by the standard Auto classes."""

from __future__ import annotations

import json

import pytest

from ftkit.tiny import MANIFEST_NAME, TINY_MODEL_ID, build_tiny_model, tiny_model_path


def test_build_is_byte_for_byte_reproducible(tmp_path):
    first = build_tiny_model(tmp_path / "a")
    second = build_tiny_model(tmp_path / "b")
    manifest_a = json.loads((first / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest_b = json.loads((second / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest_a["id"] == TINY_MODEL_ID
    assert "model.safetensors" in manifest_a["sha256"]
    assert manifest_a["sha256"] == manifest_b["sha256"]


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path)
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_cache_is_reused_and_incomplete_builds_are_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path))
    path = tiny_model_path()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt

    (path / MANIFEST_NAME).unlink()  # as if a build crashed before finishing
    rebuilt = tiny_model_path()
    assert (rebuilt / MANIFEST_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_auto_classes_load_it_and_it_trains_one_step(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Chinese is cut one known character per token, not byte by byte.
    assert len(tokenizer.tokenize("今天收到禮物")) == 6
    assert tokenizer.decode(tokenizer("今天收到禮物，很開心")["input_ids"]) == "今天收到禮物，很開心"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    batch = tokenizer(["今天收到禮物", "很開心"], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    loss_before = out.loss.item()
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        loss_after = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    assert loss_after.item() < loss_before
