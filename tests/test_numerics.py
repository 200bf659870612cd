"""Training numerics as ftkit loads and trains: QLoRA in bf16 with fp32 adapters, full fine-tuning
with fp32 master weights under autocast, and the optimizer key; all real, on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"


def _load(method: str, dtype: str = "bfloat16", head: str = "causal"):  # noqa: ANN202
    from ftkit.modeling import load_model, load_tokenizer
    from ftkit.recipe import load_recipe
    from ftkit.tiny import tiny_model_path

    recipe = load_recipe(TINY, [f'method.name="{method}"', f'model.dtype="{dtype}"', f'train.head="{head}"',
                                "method.dropout=0.05"])
    path = tiny_model_path()
    tokenizer = load_tokenizer(path, recipe)
    return load_model(path, recipe, head, None, tokenizer), tokenizer


def test_qlora_computes_in_bf16_with_4bit_weights_and_fp32_adapters():
    import torch
    from bitsandbytes.nn import Linear4bit

    loaded, tokenizer = _load("qlora")
    model = loaded.model
    assert loaded.method == "qlora" and loaded.amp is None and loaded.dtype == "bfloat16"
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    floats = {name: p.dtype for name, p in model.named_parameters() if p.dtype.is_floating_point}
    adapters = {name for name in floats if "lora_" in name}
    assert adapters and all(floats[name] == torch.float32 for name in adapters)
    # Embeddings, norms, biases: the compute dtype, not peft's fp32 upcast.
    assert {floats[name] for name in floats if name not in adapters} == {torch.bfloat16}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == adapters

    ids = tokenizer(["a short line of text to train on"] * 2, return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}  # the residual stream stays bf16
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    out.loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)


def _saved_bytes(model, tokenizer) -> int:  # noqa: ANN001
    """Bytes of the distinct non-parameter storages one forward saves for backward."""
    import torch

    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor):  # noqa: ANN001, ANN202
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = tokenizer(["one two three four five six seven eight nine ten " * 6] * 4, return_tensors="pt")["input_ids"]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


def test_qlora_saves_the_activations_lora_saves():
    # With peft's old fp32 upcast every saved activation of QLoRA was fp32, about twice LoRA's.
    qlora = _saved_bytes(_load("qlora")[0].model, _load("qlora")[1])
    lora = _saved_bytes(_load("lora")[0].model, _load("lora")[1])
    assert qlora == pytest.approx(lora, rel=0.05)


def test_full_fine_tuning_trains_fp32_master_weights_under_autocast_with_8bit_adamw(tmp_path):
    import torch
    from safetensors.torch import load_file

    from ftkit.tiny import tiny_model_path

    out = tmp_path / "full"
    env = {**os.environ, "FTKIT_TEST_KILL_AT": "final-eval"}  # stop after training: the checkpoint stays
    done = run_ftkit("run", str(TINY), "--set", 'method.name="full"', "--set", 'model.dtype="bfloat16"',
                     "--set", 'train.optim="adamw_8bit"', "--set", "train.max_steps=3", "--set", "train.lr=1e-4",
                     "--set", "eval.baseline=false", "--set", f"output.dir={json.dumps(str(out))}", env=env)
    assert done.returncode != 0  # killed where the test asked
    assert "fp32 master weights, bfloat16 compute (mixed precision)" in done.stdout
    checkpoint = next((tmp_path / "full.partial" / "checkpoints").glob("checkpoint-*"))
    args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert args.bf16 and args.optim == "adamw_bnb_8bit"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"].values()
    states = [state["__bnb_optimizer_quant_state__"] for state in saved]
    # bitsandbytes keeps 8-bit states (with their quantization maps) for tensors of 4,096 elements
    # or more, fp32 ones for smaller tensors (the norms).
    quantized = [state for state in states if "qmap1" in state]
    assert len(quantized) > len(states) / 2
    assert all(state["state1"].dtype == state["state2"].dtype == torch.uint8 for state in quantized)

    trained = load_file(checkpoint / "model.safetensors")
    base = load_file(tiny_model_path() / "model.safetensors")
    assert {t.dtype for t in trained.values()} == {torch.float32}
    # Updates a bf16 weight would have rounded away (smaller than half its spacing) are kept.
    kept = lost_in_bf16 = 0
    for name, weight in trained.items():
        if name not in base:
            continue  # the new classifier head
        start = base[name].float()
        changed = weight != start
        kept += int(changed.sum())
        lost_in_bf16 += int((changed & (weight.bfloat16() == start.bfloat16())).sum())
    assert kept and lost_in_bf16 > 0.1 * kept
