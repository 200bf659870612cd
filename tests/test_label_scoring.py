"""Label scoring: the KV-cache fast path scores exactly what the brute force scores, and the score options."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ftkit.errors import ConfigError
from ftkit.evaluator import (
    CONTENT_FREE_INPUT,
    calibrate_scores,
    evaluate,
    label_scores,
    label_scores_brute_force,
    reduce_answer_logprobs,
)
from ftkit.prepare import render_answer
from ftkit.recipe import recipe_from_dict
from ftkit.tasks import Example
from ftkit.tiny import tiny_model_path

torch = pytest.importorskip("torch")

EXAMPLES = [
    Example("今天終於放假了，好開心", "開心", instruction="這句話的情緒是？"),
    Example("I waited two hours and nobody came, I am so angry", "生氣", system="You label emotions."),
    Example("嗯", "驚訝"),
    Example("what?", "驚訝", instruction="Classify the emotion.", system="You label emotions."),
    Example("好難過啊，真的很難過，" * 6, "難過"),  # long: cut when max_len is small
]
#: Every label starts with a different token (checked below).
DISTINCT_FIRST = ["開心", "難過", "生氣", "驚訝", "害怕"]
#: Labels sharing first tokens, of different lengths: continuations must not be mixed up.
SHARED_FIRST = ["happy", "happy and calm", "happy but tired", "sad", "sad and angry"]
RECIPE = {"model": {"id": "m"}, "task": {"name": "emotion", "train_file": "t.jsonl"}, "output": {"dir": "out"}}


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()


@pytest.fixture(params=["chat template", "no chat template"])
def tokenizer(request):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    if request.param == "no chat template":
        tokenizer.chat_template = None
    return tokenizer


def first_tokens(tokenizer, labels: list[str]) -> list[int]:
    return [tokenizer(render_answer(tokenizer, EXAMPLES[0], label), add_special_tokens=False)["input_ids"][0]
            for label in labels]


def assert_same_scores(fast, brute) -> None:
    assert fast.shape == brute.shape
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, brute, rtol=1e-5, atol=1e-4)
    assert fast.argmax(-1).tolist() == brute.argmax(-1).tolist()


@pytest.mark.parametrize("labels", [DISTINCT_FIRST, SHARED_FIRST], ids=["distinct first tokens", "shared first tokens"])
@pytest.mark.parametrize("max_len", [256, 24], ids=["prompts whole", "prompts cut"])
def test_fast_path_equals_brute_force(model, tokenizer, labels, max_len):
    firsts = first_tokens(tokenizer, labels)
    assert len(set(firsts)) == (len(labels) if labels is DISTINCT_FIRST else 2)
    fast = label_scores(model, tokenizer, EXAMPLES, labels, 2, max_len, "fast")
    brute = label_scores_brute_force(model, tokenizer, EXAMPLES, labels, 2, max_len, "brute")
    assert_same_scores(fast, brute)


#: One system prompt and instruction, inputs of different lengths: most of every prompt is shared.
SHARED_PROMPT = [Example(text, label, instruction="這句話的情緒是？回答：開心、難過、生氣、驚訝或害怕。",
                         system="You label emotions.")
                 for text, label in [("今天終於放假了，好開心", "開心"), ("嗯", "驚訝"), ("what?", "驚訝"),
                                     ("I waited two hours and nobody came, I am so angry", "生氣"),
                                     ("好難過啊，真的很難過", "難過")]]


@pytest.mark.parametrize("labels", [DISTINCT_FIRST, SHARED_FIRST], ids=["distinct first tokens", "shared first tokens"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_fast_path_equals_brute_force_when_the_prompts_share_their_start(model, tokenizer, labels, batch_size):
    from ftkit.evaluator import _label_prompts, _shared_prefix

    prompts, _ = _label_prompts(tokenizer, SHARED_PROMPT, labels, 256)
    shared = _shared_prefix([p.ids for p in prompts])
    # The shared start (run once for all batches) is most of the shortest prompt, and never all of it.
    assert len(prompts[1].ids) * 3 // 4 < len(shared) < len(prompts[1].ids)
    fast = label_scores(model, tokenizer, SHARED_PROMPT, labels, batch_size, 256, "fast")
    brute = label_scores_brute_force(model, tokenizer, SHARED_PROMPT, labels, batch_size, 256, "brute")
    assert_same_scores(fast, brute)
    # One example alone shares its prompt with nobody, and scores the same as in company.
    alone = label_scores(model, tokenizer, SHARED_PROMPT[3:4], labels, batch_size, 256, "alone")
    torch.testing.assert_close(alone, brute[3:4], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("tokens_per_forward", [64, 3], ids=["labels in one forward", "labels in groups"])
def test_fast_path_equals_brute_force_with_each_attention_and_label_grouping(tokenizer, monkeypatch, attention,
                                                                            tokens_per_forward):
    from transformers import AutoModelForCausalLM

    from ftkit import evaluator

    monkeypatch.setattr(evaluator, "ANSWER_TOKENS_PER_FORWARD", tokens_per_forward)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    assert model.config._attn_implementation == attention
    for examples in (SHARED_PROMPT, EXAMPLES):
        for score in ("sum", "constrained"):
            fast = label_scores(model, tokenizer, examples, SHARED_FIRST, 2, 256, "fast", score=score)
            brute = label_scores_brute_force(model, tokenizer, examples, SHARED_FIRST, 2, 256, "brute", score=score)
            assert_same_scores(fast, brute)


def test_trie_groups_hold_at_most_the_node_budget_and_every_label_once(monkeypatch):
    from ftkit import evaluator

    monkeypatch.setattr(evaluator, "ANSWER_TOKENS_PER_FORWARD", 5)
    # Labels 0-2 share their first two tokens: three labels, five trie nodes, one group.
    paths = [[[1, 2, 3], [1, 2, 4], [1, 2, 5], [6, 7, 8, 9, 10, 11], [6, 7], [12]]]
    assert evaluator._trie_groups([0, 1, 2, 3, 4, 5], paths) == [[0, 1, 2], [3], [4, 5]]
    # The budget holds in every row: the second row's labels share nothing.
    paths.append([[1, 2, 3], [4, 5, 6], [7], [8], [9], [10]])
    assert evaluator._trie_groups([0, 1, 2], paths) == [[0], [1, 2]]
    assert evaluator._trie_groups([], paths) == []


def test_answer_trie_and_the_depths_each_score_runs():
    from ftkit.evaluator import _answer_trie, _scored_depths

    answers = [[1, 2, 3, 9], [1, 2, 4, 9], [1, 5, 9], [6, 9]]
    trie = _answer_trie(answers)
    assert trie[()] == [1, 6] and trie[(1,)] == [2, 5] and trie[(1, 2)] == [3, 4] and trie[(1, 2, 3)] == [9]
    # The log-likelihood scores every token after the first; constrained, only the branching points.
    assert _scored_depths(answers[0], trie, constrained=False) == [1, 2, 3]
    assert _scored_depths(answers[0], trie, constrained=True) == [1, 2]
    assert _scored_depths(answers[2], trie, constrained=True) == [1]
    assert _scored_depths(answers[3], trie, constrained=True) == []


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    from ftkit.evaluator import _shared_prefix

    assert _shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == [1, 2, 3]
    assert _shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert _shared_prefix([[1, 2], [1, 2]]) == [1]
    assert _shared_prefix([[9, 2], [1, 2]]) == []
    assert _shared_prefix([[1, 2, 3]]) == []


@pytest.mark.parametrize("score", ["sum", "mean", "constrained"])
@pytest.mark.parametrize("calibrate", [False, True], ids=["raw", "calibrated"])
def test_fast_path_equals_brute_force_with_every_score_option(model, tokenizer, score, calibrate):
    options = {"score": score, "calibrate": calibrate}
    fast = label_scores(model, tokenizer, EXAMPLES, SHARED_FIRST, 3, 256, "fast", **options)
    brute = label_scores_brute_force(model, tokenizer, EXAMPLES, SHARED_FIRST, 3, 256, "brute", **options)
    assert_same_scores(fast, brute)


def test_a_prefix_labels_share_runs_once(model, tokenizer):
    from ftkit.evaluator import _label_prompts

    _, answers = _label_prompts(tokenizer, EXAMPLES[:1], SHARED_FIRST, 256)
    # Every token but the last of each answer runs after the prompt, once per distinct prefix.
    prefixes = {tuple(a[:n]) for a in answers[0] for n in range(1, len(a))}
    assert len(prefixes) < sum(len(a) - 1 for a in answers[0])  # "happy" (and "sad") are shared
    widths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        fast = label_scores(model, tokenizer, EXAMPLES[:1], SHARED_FIRST, 1, 256, "x")
    finally:
        hook.remove()
    assert widths[1:] == [len(prefixes)]  # the prompt, then one forward of the labels' trie
    assert_same_scores(fast, label_scores_brute_force(model, tokenizer, EXAMPLES[:1], SHARED_FIRST, 1, 256, "x"))


def test_constrained_scores_are_a_distribution_over_the_labels(model, tokenizer):
    # Each label ends with its end-of-turn marker, so no label's answer is a prefix of another's:
    # the constrained probabilities of all labels sum to one, for every example.
    for labels in (SHARED_FIRST, DISTINCT_FIRST):
        scores = label_scores(model, tokenizer, EXAMPLES, labels, 2, 256, "x", score="constrained")
        torch.testing.assert_close(scores.exp().sum(-1), torch.ones(len(EXAMPLES)))
        # Unlike the log-likelihood, whose probabilities leave mass to every other text.
        assert (label_scores(model, tokenizer, EXAMPLES, labels, 2, 256, "x").exp().sum(-1) < 0.99).all()


def test_constrained_scoring_of_labels_with_distinct_first_tokens_runs_only_the_prompts(model, tokenizer):
    from ftkit.prepare import render_prompt

    forwards = []
    # The decoder runs in every forward: the model's own, and the labels' (decoder, then the LM head).
    hook = model.get_decoder().register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1),
                                                         with_kwargs=True)
    try:
        scores = label_scores(model, tokenizer, SHARED_PROMPT, DISTINCT_FIRST, 2, 256, "x", score="constrained")
        # The shared start once, then one forward per batch of prompts (2, 2 and 1): no label forward.
        assert len(forwards) == 1 + 3
        forwards.clear()
        label_scores(model, tokenizer, SHARED_PROMPT, DISTINCT_FIRST, 2, 256, "x", score="sum")
        assert len(forwards) == 1 + 3 + 3  # the log-likelihood runs the labels' later tokens too
    finally:
        hook.remove()
    # Each label's score: its first token's log-prob among the labels' first tokens, after the prompt alone.
    firsts = first_tokens(tokenizer, DISTINCT_FIRST)
    with torch.inference_mode():
        expected = torch.stack([
            model(input_ids=torch.tensor([tokenizer(render_prompt(tokenizer, e), add_special_tokens=False)["input_ids"]
                                          ])).logits[0, -1, firsts].log_softmax(-1)
            for e in SHARED_PROMPT])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)


def test_fast_path_equals_brute_force_through_a_lora_adapter(model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    torch.manual_seed(0)
    # init_lora_weights=False: random B, so the adapter really changes the scores.
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False)).eval()
    fast = label_scores(wrapped, tokenizer, EXAMPLES, SHARED_FIRST, 2, 24, "fast")
    brute = label_scores_brute_force(wrapped, tokenizer, EXAMPLES, SHARED_FIRST, 2, 24, "brute")
    assert_same_scores(fast, brute)
    unadapted = label_scores(model, tokenizer, EXAMPLES, SHARED_FIRST, 2, 24, "base")
    assert not torch.allclose(fast, unadapted, atol=1e-3)


def test_mean_divides_by_the_number_of_answer_tokens():
    total = torch.tensor([[-6.0, -3.0], [-1.0, 0.0]])
    count = torch.tensor([[3, 1], [1, 0]])
    assert reduce_answer_logprobs(total, count, "sum") is total
    # An empty answer (0 tokens) scores 0, as its sum does, instead of dividing by zero.
    assert reduce_answer_logprobs(total, count, "mean").tolist() == [[-2.0, -3.0], [-1.0, 0.0]]
    with pytest.raises(ValueError, match="`score` must be one of sum, mean, constrained"):
        reduce_answer_logprobs(total, count, "median")


def test_calibration_divides_out_the_content_free_prior():
    # The model prefers label 0 whatever the input: p_cf = (0.8, 0.2).
    content_free = torch.log(torch.tensor([[0.8, 0.2]]))
    scores = torch.log(torch.tensor([[0.7, 0.3], [0.9, 0.1]]))
    calibrated = calibrate_scores(scores, content_free)
    # Zhao et al. 2021: q ∝ p / p_cf.
    expected = torch.tensor([[0.7 / 0.8, 0.3 / 0.2], [0.9 / 0.8, 0.1 / 0.2]])
    torch.testing.assert_close(calibrated.softmax(-1), expected / expected.sum(-1, keepdim=True))
    assert calibrated.argmax(-1).tolist() == [1, 0]
    # Only the content-free distribution over the labels matters, not its scale.
    torch.testing.assert_close(calibrate_scores(scores, content_free - 5.0), calibrated)
    assert math.isclose(calibrated[0, 0].item(), math.log(0.7) - math.log(0.8), rel_tol=1e-6)


def test_calibration_scores_the_labels_after_a_content_free_input(model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    calibrated = label_scores(model, tokenizer, EXAMPLES, DISTINCT_FIRST, 4, 256, "x", calibrate=True)
    raw = label_scores(model, tokenizer, EXAMPLES, DISTINCT_FIRST, 4, 256, "x")
    # Same system prompt and instruction, input N/A.
    blank = [Example(CONTENT_FREE_INPUT, "", instruction=e.instruction, system=e.system) for e in EXAMPLES]
    prior = label_scores(model, tokenizer, blank, DISTINCT_FIRST, 4, 256, "x")
    torch.testing.assert_close(calibrated, raw - prior.log_softmax(-1))


def test_recipe_keys_default_to_todays_scores_and_reject_unknown_values():
    recipe = recipe_from_dict(RECIPE)
    assert (recipe.eval.label_score, recipe.eval.calibrate) == ("sum", False)
    with pytest.raises(ConfigError, match="eval.label_score: 'median' is not one of sum, mean, constrained"):
        recipe_from_dict({**RECIPE, "eval": {"label_score": "median"}})


def test_evaluate_passes_the_recipes_score_options_on(monkeypatch):
    from ftkit import evaluator

    seen = {}

    def fake_label_scores(model, tokenizer, examples, labels, batch_size, max_len, desc, **options):
        seen.update(options)
        return torch.zeros((len(examples), len(labels)))

    monkeypatch.setattr(evaluator, "label_scores", fake_label_scores)
    recipe = recipe_from_dict({**RECIPE, "eval": {"label_score": "mean", "calibrate": True}})
    task = SimpleNamespace(kind="classification", metrics=lambda predictions, references: {})
    model = SimpleNamespace(training=False, eval=lambda: None, train=lambda mode: None)
    evaluate(model, None, task, EXAMPLES[:2], "causal", ["a", "b"], recipe, "test")
    assert seen == {"score": "mean", "calibrate": True}


# The best-first search (predict_label_scores under `sum` and `constrained`): same labels as the brute force.

#: Ten labels in a trie of several levels, one of them twice (the first of equals wins, as in argmax).
MANY = ["happy", "happy and calm", "happy but tired", "sad", "sad and angry", "calm", "calm and happy",
        "angry", "angry and sad", "happy"]


def assert_searches_like_the_brute_force(model, tokenizer, examples, labels, max_len, score, batch_size=2) -> list:
    """The search's best labels and their scores are the brute force's; the decoder forwards' widths."""
    from ftkit.evaluator import _best_labels_and_scores

    widths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        found = _best_labels_and_scores(model, tokenizer, examples, labels, batch_size, max_len, "search",
                                        constrained=score == "constrained")
    finally:
        hook.remove()
    brute = label_scores_brute_force(model, tokenizer, examples, labels, 2, max_len, "brute", score=score)
    assert [j for j, _ in found] == brute.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor([value for _, value in found]), brute.max(-1).values, rtol=1e-5, atol=1e-4)
    return widths


@pytest.mark.parametrize("labels", [SHARED_FIRST, MANY], ids=["5 labels", "10 labels, one twice"])
@pytest.mark.parametrize("score", ["sum", "constrained"])
@pytest.mark.parametrize(("per_round", "columns", "max_len"), [(32, 256, 256), (1, 256, 24), (1, 6, 256), (1, 1, 24)],
                         ids=["rounds of 32", "one prefix a round, prompts cut", "cache kept to 6 columns",
                              "cache full, prompts cut"])
def test_search_picks_the_brute_forces_labels(model, tokenizer, monkeypatch, labels, score, per_round, columns,
                                              max_len):
    from ftkit import evaluator

    # Search however few trie nodes there are; one prefix a round keeps ancestors in the KV cache
    # longest; a cache of 6 columns keeps only the ancestors of prefixes still to run; one too small
    # for those leaves the batch to score every label.
    monkeypatch.setattr(evaluator, "ANSWER_TOKENS_PER_FORWARD", 0)
    monkeypatch.setattr(evaluator, "SEARCH_PREFIXES_PER_ROUND", per_round)
    monkeypatch.setattr(evaluator, "SEARCH_COLUMNS", columns)
    for examples in (EXAMPLES, SHARED_PROMPT):
        widths = assert_searches_like_the_brute_force(model, tokenizer, examples, labels, max_len, score)
        assert len(widths) > 1 + 3  # the shared start, 3 batches of prompts, then the search's rounds


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_search_picks_the_brute_forces_labels_with_each_attention_and_a_lora_adapter(tokenizer, monkeypatch, attention):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftkit import evaluator

    monkeypatch.setattr(evaluator, "ANSWER_TOKENS_PER_FORWARD", 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32, attn_implementation=attention)
    torch.manual_seed(0)
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False)).eval()
    for score in ("sum", "constrained"):
        assert_searches_like_the_brute_force(wrapped, tokenizer, EXAMPLES, MANY, 24, score, batch_size=3)
        # What an evaluation calls: the labels themselves.
        predicted = evaluator.predict_label_scores(wrapped, tokenizer, EXAMPLES, MANY, 3, 24, "search", score=score)
        scores = label_scores_brute_force(wrapped, tokenizer, EXAMPLES, MANY, 3, 24, "brute", score=score)
        assert predicted == [MANY[j] for j in scores.argmax(-1).tolist()]


@pytest.fixture(scope="module")
def confident():
    """The tiny model trained until it answers each of four examples with its own label of MANY."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.evaluator import _pad
    from ftkit.prepare import encode_causal

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    examples = [replace(e, target=label, references=(label,))
                for e, label in zip(EXAMPLES[:4], ["sad and angry", "calm and happy", "happy but tired", "angry"])]
    batch = _pad(tokenizer, [encode_causal(tokenizer, e, 256) for e in examples], "cpu")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, examples


def test_a_confident_model_runs_few_of_the_tries_nodes(confident, monkeypatch):
    from ftkit import evaluator
    from ftkit.evaluator import _answer_trie, _label_prompts, _trie_columns

    model, tokenizer, examples = confident
    monkeypatch.setattr(evaluator, "ANSWER_TOKENS_PER_FORWARD", 0)
    brute = label_scores_brute_force(model, tokenizer, examples, MANY, 4, 256, "brute")
    assert [MANY[j] for j in brute.argmax(-1).tolist()] == [e.target for e in examples]
    assert (brute.max(-1).values > math.log(0.5)).all()  # each answer more likely than not
    widths = assert_searches_like_the_brute_force(model, tokenizer, examples, MANY, 256, "sum", batch_size=4)
    _, answers = _label_prompts(tokenizer, examples, MANY, 256)
    trie = sum(_trie_columns(row, _answer_trie(row), constrained=False) for row in answers)
    # The shared start and the prompts ran first; then the search ran under a third of the trie's nodes.
    assert 0 < sum(widths[2:]) < trie / 3
    longest = max(len(a) for a in answers[0]) - 1
    assert len(widths) - 2 <= longest  # about one round per answer token: the winner's path, nothing wide
