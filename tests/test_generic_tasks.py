"""The generic tasks: `classify` (text or text pair -> your labels) and `sft` (three chat layouts).

Runs go through the real CLI on the built-in tiny model; the loss masks are checked token by token
with the tiny model's real tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftkit.errors import DataError
from ftkit.prepare import IGNORE_INDEX, encode_causal, encode_classifier, render_prompt
from tests.conftest import run_ftkit

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = ["--set", 'model.id="ftkit/tiny-qwen2"', "--set", 'model.source="builtin"']
QUICK = ["--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.lr=1e-3",
         "--set", 'method.target_modules=["q_proj","v_proj"]']

CONVERSATION = [
    {"role": "system", "content": "You are a patient maths tutor."},
    {"role": "user", "content": "What is a prime number?"},
    {"role": "assistant", "content": "A number greater than one with no divisors but one and itself."},
    {"role": "user", "content": "Is nine prime?"},
    {"role": "assistant", "content": "No, nine is three times three."},
    {"role": "user", "content": "And seven?"},
    {"role": "assistant", "content": "Yes, seven is prime."},
]
REPLIES = [t["content"] for t in CONVERSATION if t["role"] == "assistant"]


def toml_str(path: Path) -> str:
    return json.dumps(str(path))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ftkit.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


def sft_example(record: dict, **options):
    from ftkit_plugins.sft import TASK

    (row,) = TASK.parse(record, "test:1", **options)
    return TASK.format(row)


def learned_spans(tokenizer, features: dict) -> list[str]:
    """The decoded runs of tokens the loss sees (labels not -100), in order."""
    assert len(features["labels"]) == len(features["input_ids"])
    spans, current = [], []
    for token, label in zip(features["input_ids"], features["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


# -- sft: the layouts, and the loss on assistant turns only ----------------------------------------

def test_each_sft_layout_parses_to_the_same_example():
    system, (user1, reply1, user2, reply2) = CONVERSATION[0]["content"], CONVERSATION[1:5]
    openai = {"messages": CONVERSATION[:5]}
    sharegpt = {"system": system, "conversations": [
        {"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in CONVERSATION[1:5]]}
    alpaca = {"system": system, "instruction": user2["content"], "input": "", "output": reply2["content"],
              "history": [[user1["content"], reply1["content"]]]}
    examples = [sft_example(record) for record in (openai, sharegpt, alpaca)]
    assert examples[0] == examples[1] == examples[2]
    assert examples[0].input == "Is nine prime?" and examples[0].target == "No, nine is three times three."
    assert examples[0].system == system and list(examples[0].messages) == CONVERSATION[:5]
    # Alpaca's input follows the instruction in the user turn; a default system prompt fills a gap.
    single = sft_example({"instruction": "Translate.", "input": "Good morning", "output": "Bonjour"},
                         system_prompt="Be terse.")
    assert list(single.messages) == [{"role": "system", "content": "Be terse."},
                                     {"role": "user", "content": "Translate.\nGood morning"},
                                     {"role": "assistant", "content": "Bonjour"}]


def with_template(tokenizer, template: bool):  # noqa: ANN001, ANN201 - a transformers tokenizer
    """The tokenizer as is, or a copy without its chat template (ftkit's plain layout)."""
    import copy

    tok = copy.copy(tokenizer)
    if not template:
        tok.chat_template = None
    return tok


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain"])
def test_labels_cover_exactly_the_assistant_turns_of_a_three_turn_conversation(tokenizer, template):
    tok = with_template(tokenizer, template)
    example = sft_example({"messages": CONVERSATION})
    features = encode_causal(tok, example, max_len=1024)
    end = tok.eos_token  # <|im_end|>: the end-of-turn marker is learned, so generation stops
    assert learned_spans(tok, features) == [reply + end for reply in REPLIES]
    # The prompt for evaluation is everything before the last reply, ending with the reply's header.
    prompt = render_prompt(tok, example)
    assert prompt.endswith("<|im_start|>assistant\n" if template else "And seven?\n\nAnswer: ")
    assert REPLIES[1] in prompt and REPLIES[2] not in prompt
    text = tok.decode(features["input_ids"])
    assert text.startswith(prompt) and text[len(prompt):] == REPLIES[2] + end


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain"])
def test_a_long_conversation_loses_its_oldest_turns_first(tokenizer, template):
    tok = with_template(tokenizer, template)
    example = sft_example({"messages": CONVERSATION})
    full = encode_causal(tok, example, max_len=1024)
    cut = encode_causal(tok, example, max_len=len(full["input_ids"]) - 5)
    assert len(cut["input_ids"]) <= len(full["input_ids"]) - 5
    assert learned_spans(tok, cut) == [reply + tok.eos_token for reply in REPLIES[1:]]
    text = tok.decode(cut["input_ids"])
    assert "You are a patient maths tutor." in text  # the system prompt stays
    assert "What is a prime number?" not in text  # the first exchange went, whole


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "ends with a user turn"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"conversations": [{"from": "gpt", "value": "hello"}]}, "must start with a user turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "is empty"),
    ({"text": "hello"}, "no conversation; expected 'messages' (OpenAI)"),
])
def test_a_bad_conversation_is_rejected_with_its_place(record, message):
    with pytest.raises(DataError, match="^test:1: ") as caught:
        sft_example(record)
    assert message in str(caught.value)


def test_sft_reads_a_file_mixing_the_three_layouts():
    from ftkit_plugins.sft import TASK

    examples = [TASK.format(row) for row in TASK.load(FIXTURES / "sft_mixed.jsonl")]
    assert len(examples) == 10
    longest = max(examples, key=lambda e: len(e.messages))
    assert [t["role"] for t in longest.messages] == ["system"] + ["user", "assistant"] * 3
    assert TASK.metrics([e.target for e in examples], [e.references for e in examples])["rougeL"] == 100.0


@pytest.mark.slow
def test_sft_runs_end_to_end_and_reports_perplexity_bleu_chrf_and_rouge(tmp_path):
    out = tmp_path / "sft"
    done = run_ftkit("run", str(ROOT / "recipes" / "sft.toml"), *TINY, *QUICK, "--set", "train.max_seq_len=256",
                     "--set", "eval.max_new_tokens=8", "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for name in ("perplexity", "bleu", "chrf", "rougeL"):
        assert name in metrics["finetuned"] and name in metrics["baselines"]["zero_shot"], name
    assert metrics["train_examples"] == 8 and metrics["test_examples"] == 2
    # The run folder keeps whole conversations, so `ftkit eval` re-scores the same prompts.
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(row["messages"][-1] == {"role": "assistant", "content": row["target"]} for row in rows)


# -- classify: a real text pair, labels from the data ----------------------------------------------

def test_a_text_pair_reaches_the_classifier_as_a_pair_and_a_causal_prompt_as_text(tokenizer):
    from ftkit_plugins.classify import TASK

    from ftkit.sources import DataMapping, load_task_data

    data = load_task_data(TASK, FIXTURES / "classify_pairs.csv",
                          DataMapping(columns={"text": "premise", "text_pair": "hypothesis", "label": "relation"}))
    assert data.labels == ["contradicts", "entails"]
    example = data.examples(TASK)[0]
    assert (example.input, example.pair) == ("The kettle is boiling on the stove.", "Water is being heated.")
    encoded = encode_classifier(tokenizer, example, 256, {"contradicts": 0, "entails": 1})
    assert encoded["input_ids"] == tokenizer(example.input, example.pair, truncation=True, max_length=256)["input_ids"]
    assert encoded["labels"] == 1
    prompt = render_prompt(tokenizer, example)
    assert example.input in prompt and example.pair in prompt


@pytest.mark.slow
@pytest.mark.parametrize("head", ["classifier", "causal"])
def test_classify_runs_end_to_end_with_labels_from_the_data(tmp_path, head):
    out = tmp_path / head
    done = run_ftkit("run", str(ROOT / "recipes" / "classify.toml"), *TINY, *QUICK, "--set", f'train.head="{head}"',
                     "--set", "train.max_seq_len=64", "--set", f"output.dir={toml_str(out)}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "labels.json").read_text(encoding="utf-8"))["labels"] == ["contradicts", "entails"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train_examples"] == 12 and metrics["test_examples"] == 4
    assert 0.0 <= metrics["finetuned"]["macro_f1"] <= 1.0
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(row["pair"] for row in rows)


@pytest.mark.parametrize("name", ["classify", "sft"])
def test_the_generic_tasks_are_registered_and_keep_the_contract(name):
    from ftkit.plugins import registered_tasks

    task = registered_tasks()[name][0]
    task.check()
    assert task.labels is None
    assert task.headline_metric == ("macro_f1" if name == "classify" else "rougeL")
