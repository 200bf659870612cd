"""Using a finished run: open it, predict, evaluate, chat, merge.

A run folder (``ftkit run``'s ``output.dir``) holds all this needs: ``recipe.toml`` (resolved,
absolute paths), ``labels.json`` (head and label set), ``adapter/`` (the standard peft
adapter_config.json + adapter_model.safetensors, and the tokenizer) or ``model/`` (full
fine-tuning), ``data/test.jsonl`` (the exact test split), ``metrics.json`` and ``manifest.json``.

The base model is loaded as the run trained it (4-bit NF4 for QLoRA, the recipe's dtype), so
``ftkit eval`` on the run's own test split reproduces metrics.json. Merging is the exception: a
merged model cannot stay 4-bit, so it loads the base unquantized in the compute dtype.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ftkit.data import read_json, read_records, require_str
from ftkit.datatools import usual_permissions
from ftkit.errors import DataError, ModelError, UsageError
from ftkit.recipe import Recipe
from ftkit.tasks import Example, Task

Echo = Callable[[str], None]
RUN_FILES = ("recipe.toml", "labels.json", "metrics.json", "manifest.json")
#: Keys of ftkit's own example layout: the run's data/test.jsonl, accepted for every task.
#: (A conversation's rows also hold ``messages``, which the sft task's own parser reads.)
EXAMPLE_KEYS = frozenset({"input", "target", "output", "references", "instruction", "system", "pair"})


@dataclass
class RunFolder:
    """A complete run folder and what it says about itself (no model loaded yet)."""

    path: Path
    recipe: Recipe
    task: Task
    head: str  # classifier or causal
    labels: list[str] | None
    method: str  # what ran: qlora, lora or full
    weights: Path  # adapter/ or model/

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def test_split(self) -> Path:
        return self.path / "data" / "test.jsonl"


def open_run(path: str | Path) -> RunFolder:
    """Check that ``path`` is a complete run folder and read its recipe, task and labels."""
    from ftkit.plugins import get_task
    from ftkit.recipe import load_recipe

    path = Path(path)
    if path.name.endswith(".partial") and path.is_dir():
        raise UsageError(f"{path}: an unfinished run (interrupted or still training), not a complete run folder; "
                         "continue it with `ftkit run RECIPE --resume`")
    if not path.exists():
        unfinished = path.with_name(path.name + ".partial")
        hint = f" ({unfinished} holds an unfinished run)" if unfinished.is_dir() else ""
        raise UsageError(f"{path}: no such run folder{hint}; give the output.dir of a finished `ftkit run`")
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder; give a run folder (the output.dir of `ftkit run`)")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    metrics = read_json(path / "metrics.json") if "metrics.json" not in missing else {}
    method = metrics.get("method", "lora")
    weights = path / ("adapter" if method in ("lora", "qlora") else "model")
    needed = ("adapter_config.json", "adapter_model.safetensors") if weights.name == "adapter" else ("config.json",)
    missing += [f"{weights.name}/{name}" for name in needed if not (weights / name).is_file()]
    if missing:
        raise UsageError(f"{path}: not a complete run folder (missing {', '.join(missing)}); "
                         "give the output.dir of a finished `ftkit run`")
    recipe = load_recipe(path / "recipe.toml")
    labels = read_json(path / "labels.json")
    task = get_task(recipe.task.name)
    return RunFolder(path=path, recipe=recipe, task=task, head=labels.get("head") or task.default_head,
                     labels=labels.get("labels"), method=method, weights=weights)


# -- input rows ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputRow:
    """One example to predict on, where it came from, and whether it carries a target."""

    where: str
    example: Example
    labelled: bool


@dataclass(frozen=True)
class PromptDefaults:
    """The instruction and system prompt every example of the run's test split shares (None if they vary)."""

    instruction: str | None = None
    system: str | None = None


def trained_defaults(run: RunFolder) -> PromptDefaults:
    """What the model saw around each input in training, read back from the saved test split."""
    from ftkit.data import iter_jsonl

    if not run.test_split.is_file():
        return PromptDefaults(system=run.recipe.task.options.get("system_prompt"))
    instructions, systems = set(), set()
    for _, row in iter_jsonl(run.test_split):
        instructions.add(row.get("instruction"))
        systems.add(row.get("system"))
    return PromptDefaults(instruction=instructions.pop() if len(instructions) == 1 else None,
                          system=systems.pop() if len(systems) == 1 else run.recipe.task.options.get("system_prompt"))


def read_inputs(run: RunFolder, path: str | Path, *, need_target: bool = False) -> list[InputRow]:
    """Rows of ``path`` as examples, in the task's own layout or in ftkit's example layout.

    Each record goes through the task's reader and parser first (file:line errors). A record the
    parser rejects is taken in ftkit's example layout when it fits it: ``{"input"}`` plus optional
    ``instruction``, ``system``, ``pair``, ``target`` (or ``output``) and ``references`` — the layout of the
    run's ``data/test.jsonl``. There the target is optional, and a missing instruction or system
    prompt is the one the run trained with.
    """
    path = Path(path)
    task = run.task
    from dataclasses import replace

    from ftkit.sources import DataMapping, record_rows, source_records

    # The run's own mapping (columns, label_map, drop_labels), with the labels it trained on.
    mapping = DataMapping.from_section(run.recipe.task)
    if run.labels:
        mapping = replace(mapping, labels=tuple(run.labels))
    defaults = trained_defaults(run)
    rows: list[InputRow] = []
    if task.parse is None and not task.fields:  # only a whole-file loader: the task's layout, else ftkit's
        options = dict(mapping.options) | ({"labels": run.labels} if run.labels else {})
        try:
            rows = [InputRow(f"{path}[{i}]", task.format(row), True) for i, row in enumerate(task.load(path, **options))]
        except DataError:
            rows = [_example_row(record, where, defaults, run.labels) for where, record in read_records(path)]
    else:
        for where, record in (task.read or source_records)(path):
            try:
                rows += [InputRow(where, task.format(row), True) for row in record_rows(task, record, where, mapping)]
            except DataError:
                if "input" not in record or not set(record) <= EXAMPLE_KEYS:
                    raise
                rows.append(_example_row(record, where, defaults, run.labels))
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty or every row was dropped")
    if need_target:
        for row in rows:
            if not row.labelled:
                raise DataError(f"{row.where}: no target; evaluation needs labelled rows (`ftkit predict` takes "
                                "rows without one)")
    return rows


def _optional_str(record: Mapping[str, Any], key: str, where: str, default: str | None) -> str | None:
    if key not in record:
        return default
    value = record[key]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value or None


def _example_row(record: Mapping[str, Any], where: str, defaults: PromptDefaults, labels: list[str] | None) -> InputRow:
    """A record in ftkit's example layout (``input``, optional target) as an InputRow."""
    text = require_str(record, "input", where)
    target = _optional_str(record, "target" if "target" in record else "output", where, None)
    references = record.get("references") or ([target] if target else [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise DataError(f"{where}: field 'references' must be a list of strings")
    if labels and target and target not in labels:
        raise DataError(f"{where}: target {target!r} is not one of the run's labels: {', '.join(labels)}")
    example = Example(input=text, target=target or (references[0] if references else ""),
                      references=tuple(references),
                      instruction=_optional_str(record, "instruction", where, defaults.instruction),
                      system=_optional_str(record, "system", where, defaults.system),
                      pair=_optional_str(record, "pair", where, None))
    return InputRow(where, example, labelled=bool(references))


# -- loading -------------------------------------------------------------------------------------

def base_model_path(run: RunFolder, echo: Echo = print) -> Path:
    """The base model folder the run trained on (manifest.json), else the recipe's model found again."""
    from ftkit.modeling import resolve_model_path

    recorded = read_json(run.path / "manifest.json").get("model_path")
    if recorded and Path(recorded).is_absolute() and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    return resolve_model_path(run.recipe, echo)


def _model_class(head: str):  # noqa: ANN202 - a transformers auto class
    if head == "classifier":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    from ftkit.pipeline import _quiet_libraries as quiet_training_chatter

    quiet_training_chatter()
    hf_logging.disable_progress_bar()  # the "Loading weights" bar, on every load


def load_model(run: RunFolder, *, quantized: bool = True, dtype: str = "auto", device: str | None = None,
               echo: Echo = print) -> tuple[Any, Any]:
    """(model, tokenizer): the base with the adapter on top (or the full model), in eval mode.

    ``quantized=False`` loads a QLoRA run's base unquantized in the compute dtype (for merging).
    ``device`` defaults to the GPU when there is one. Says what it loads, and then how long that took
    (torch's import included: the wait before a first prediction).
    """
    started = time.perf_counter()
    import torch

    from ftkit.modeling import compute_dtype, load_tokenizer, weights_dtype

    _quiet_libraries()
    tokenizer = load_tokenizer(run.weights, run.recipe)
    # As the run evaluated it: a full fine-tuning run's fp32 master weights stay fp32.
    torch_dtype = weights_dtype(run.method, compute_dtype(run.recipe)) if dtype == "auto" else getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    what = f"{run.recipe.model.id} with the run's adapter" if run.is_adapter else f"the fine-tuned model {run.weights}"
    echo(f"Loading {what}{' in 4-bit' if run.method == 'qlora' and quantized else ''} on {device} ...")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": run.recipe.model.trust_remote_code}
    if run.head == "classifier":
        kwargs.update(num_labels=len(run.labels), id2label=dict(enumerate(run.labels)),
                      label2id={label: i for i, label in enumerate(run.labels)})
    source = base_model_path(run, echo) if run.is_adapter else run.weights
    model = None
    if run.method == "qlora" and quantized:
        model = _load_4bit(source, kwargs, run.head, device, echo)
    if model is None:
        try:
            model = _model_class(run.head).from_pretrained(source, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelError(f"{source}: cannot load it as a {run.head} model: {error}") from error
        model.to(device)
    if run.head == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if run.is_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, run.weights)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise ModelError(f"{run.weights}: cannot load the adapter onto {source}: {error}") from error
    echo(f"Loaded in {time.perf_counter() - started:.1f} s")
    return model.eval(), tokenizer


def _load_4bit(source: Path, kwargs: dict[str, Any], head: str, device: str, echo: Echo):  # noqa: ANN202
    """The base in 4-bit NF4 exactly as ``modeling.load_model`` trains QLoRA; None where bitsandbytes fails."""
    from ftkit.modeling import quantization_config

    quant = quantization_config(kwargs["dtype"])
    try:
        model = _model_class(head).from_pretrained(source, quantization_config=quant,
                                                   device_map={"": 0} if device == "cuda" else None, **kwargs)
    except Exception as error:  # noqa: BLE001 - bitsandbytes fails in many backend-specific ways
        echo(f"Notice: 4-bit loading unavailable here ({type(error).__name__}); using the unquantized base, "
             "so results can differ slightly from the run's")
        return None
    if device != "cuda":
        from ftkit.modeling import keep_4bit_weights_trainable_on_cpu

        keep_4bit_weights_trainable_on_cpu(model)  # the run's 4-bit kernel, so its numbers reproduce exactly
    return model


# -- predict / evaluate --------------------------------------------------------------------------

def predict(model, tokenizer, run: RunFolder, rows: list[InputRow], batch_size: int | None = None,  # noqa: ANN001
            desc: str = "predicting") -> list[dict[str, Any]]:
    """One result per row: the label and every label's probability, or the generated text.

    Probabilities: a softmax over the classifier head's logits, or (causal head) over each label's
    score as the answer (its log-likelihood, or as the recipe's ``eval.label_score`` and
    ``eval.calibrate`` say), i.e. label-restricted decoding normalized over the labels.
    """
    from ftkit.evaluator import classifier_scores, generate, label_scores

    examples = [row.example for row in rows]
    batch, max_len = batch_size or run.recipe.eval.batch_size, run.recipe.train.max_seq_len
    results = [{"source": row.where, "input": row.example.input} for row in rows]
    if run.task.kind == "classification":
        if run.head == "classifier":
            scores = classifier_scores(model, tokenizer, examples, batch, max_len, desc)
        else:
            scores = label_scores(model, tokenizer, examples, run.labels, batch, max_len, desc,
                                  score=run.recipe.eval.label_score, calibrate=run.recipe.eval.calibrate)
        for result, best, probs in zip(results, scores.argmax(-1).tolist(), scores.softmax(-1).tolist()):
            result["prediction"] = run.labels[best]
            result["probabilities"] = dict(zip(run.labels, probs))
    else:
        for result, text in zip(results, generate(model, tokenizer, examples, run.recipe.eval, batch, max_len, desc)):
            result["prediction"] = text
    for result, row in zip(results, rows):
        if row.labelled:
            result["target"] = row.example.target
            result["references"] = list(row.example.references)
    return results


def evaluate(model, tokenizer, run: RunFolder, rows: list[InputRow], batch_size: int | None = None) -> dict[str, Any]:  # noqa: ANN001
    """The task's metrics on labelled ``rows``, through the pipeline's own evaluator."""
    from ftkit.evaluator import evaluate as evaluate_examples

    recipe = run.recipe
    if batch_size:
        recipe = _replace_eval(recipe, batch_size=batch_size)
    return evaluate_examples(model, tokenizer, run.task, [row.example for row in rows], run.head, run.labels,
                             recipe, run.path.name)


def _replace_eval(recipe: Recipe, **changes: Any) -> Recipe:
    from dataclasses import replace

    return replace(recipe, eval=replace(recipe.eval, **changes))


# -- chat ----------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    """Decoding settings, named as in the recipe's ``[eval]`` section."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides: Any) -> GenerationSettings:
        """The recipe's values, with each non-None override in their place."""
        values = {f.name: getattr(recipe.eval, f.name) for f in fields(cls)}
        return cls(**values | {k: v for k, v in overrides.items() if v is not None})


def default_system_prompt(run: RunFolder) -> str | None:
    """The system prompt the run trained with, if every example had the same one."""
    return trained_defaults(run).system


@dataclass
class ChatSession:
    """A conversation with the model: the history is kept between turns until :meth:`reset`."""

    model: Any
    tokenizer: Any
    settings: GenerationSettings
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, stream: bool = False) -> str:
        """The model's answer to ``text`` after the history so far (printed as it comes with ``stream``)."""
        import torch

        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [*self.history, {"role": "user", "content": text}]
        ids = self.tokenizer(chat_prompt(self.tokenizer, messages), add_special_tokens=False,
                             return_tensors="pt")["input_ids"]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] + self.settings.max_new_tokens > limit:  # keep the most recent turns
            ids = ids[:, -max(limit - self.settings.max_new_tokens, 1):]
        ids = ids.to(next(self.model.parameters()).device)
        options = generation_options(self.tokenizer, self.settings)
        if stream:
            from transformers import TextStreamer

            options["streamer"] = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:  # noqa: ANN001
    """The conversation as the model reads it: :func:`ftkit.prepare.render_conversation`, as in training."""
    from ftkit.prepare import render_conversation

    return render_conversation(tokenizer, messages, add_generation_prompt=True)


def generation_options(tokenizer, settings: GenerationSettings) -> dict[str, Any]:  # noqa: ANN001
    """:func:`ftkit.evaluator.generation_options`: chat generates exactly as evaluation does."""
    from ftkit.evaluator import generation_options as options

    return options(tokenizer, settings)


# -- merge ---------------------------------------------------------------------------------------

def merge(run: RunFolder, out: str | Path, *, overwrite: bool = False, dtype: str = "auto",
          echo: Echo = print) -> Path:
    """Fold the LoRA weights into the base and save a standalone model (safetensors) with the tokenizer.

    Written into a temporary folder beside ``out`` and renamed into place when complete, with
    :data:`ftkit.folders.MERGE_MARK` (the run and the base it came from): ``overwrite`` replaces only
    a folder ftkit made (ftkit.folders).
    """
    from ftkit import __version__
    from ftkit.folders import MERGE_MARK, check_replaceable
    from ftkit.report import write_json

    out = Path(out)
    if not run.is_adapter:
        raise UsageError(f"{run.path}: a full fine-tuning run; {run.weights} is already a standalone model")
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite or choose another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file; give a folder to write the merged model to")
    if out.resolve() == run.path.resolve() or out.resolve() in run.path.resolve().parents:
        raise UsageError(f"{out}: holds the run folder {run.path}; write the merged model somewhere else")
    if out.exists() or out.is_symlink():
        check_replaceable(out, "-o", [("the run's folder", run.path)])
    echo(f"Run {run.path}: {run.task.name}, {run.head} head, {run.method}")
    if run.method == "qlora":
        echo("Notice: QLoRA run: merging into the base loaded unquantized (dequantized) in the compute dtype; "
             "its outputs differ slightly from the 4-bit model the adapter was trained on")
    model, tokenizer = load_model(run, quantized=False, dtype=dtype, device="cpu", echo=echo)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        merged.save_pretrained(work)  # transformers 5 writes safetensors only (no pickle format left)
        tokenizer.save_pretrained(work)
        write_json(work / MERGE_MARK, {"made_by": "ftkit", "versions": {"ftkit": __version__},
                                       "run": str(run.path.resolve()), "base_model": run.recipe.model.id})
        pickled = [p.name for p in work.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickled:
            raise ModelError(f"merge wrote pickle files ({', '.join(pickled)}); expected safetensors only")
        # So the user a server runs as can read the model.
        usual_permissions(work)
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _move_into_place(work: Path, out: Path) -> None:
    """Rename ``work`` to ``out``; an existing ``out`` is removed only after the new one is in place."""
    if not out.exists():
        work.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)
