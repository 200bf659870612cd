"""Recipes: TOML files that say what to fine-tune, on what, how, and where the results go.

Validation is strict and complete: every problem is collected and reported together, one
``section.key: message`` per line; an unknown key is an error with a "did you mean". Paths in a
recipe are resolved relative to the recipe file, so a recipe runs the same from any directory.
Each field is documented once, here, in its ``help``.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ftkit.errors import ConfigError, UsageError

#: How a causal LM scores a label as the answer (``eval.label_score``; ftkit.evaluator.label_scores).
LABEL_SCORES = ("sum", "mean", "constrained")


def _f(default: Any = MISSING, help: str = "", *, choices: tuple = (), low: float | None = None,
       high: float | None = None, low_open: bool = False, path: bool = False, kind: type | None = None) -> Any:
    """A recipe field: its default, what it does, and the checks its value must pass."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open, "path": path,
            "kind": kind}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    id: str = _f(help="model id on the hub (`Qwen/Qwen2.5-1.5B-Instruct`), a local folder, a `.gguf` file "
                 "(relative to the recipe), or a builtin: `ftkit/tiny-qwen2`, `ftkit/smollm2-135m-instruct`")
    source: str = _f("modelscope", "where `id` is fetched from; gguf: a GGUF file, dequantized once into ftkit's "
                     "cache (fine-tuning starts from the dequantized weights)",
                     choices=("modelscope", "huggingface", "local", "builtin", "gguf"))
    revision: str = _f("", "hub revision (branch, tag or commit); empty: the default branch")
    dtype: str = _f("auto", "weight dtype; auto: float32 on CPU, bfloat16 (else float16) on CUDA",
                    choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = _f(False, "run Python code shipped with the model (only for models you trust)")


@dataclass
class TaskSection:
    name: str = _f(help="task plugin name, see `ftkit tasks`")
    train_file: str = _f("", "training data file; empty: the task's hub dataset", path=True)
    test_file: str = _f("", "held-out test file; empty: split `test_size` off the training data", path=True)
    test_size: float = _f(0.2, "fraction held out for testing when there is no `test_file`", low=0.0, high=0.9,
                          low_open=True)
    valid_file: str = _f("", "validation file, evaluated during training (see `train.eval_steps`) to pick the best "
                         "step and stop early; never the test data; empty: none, or `train.valid_size`", path=True)
    max_examples: int = _f(0, "sample at most this many examples (stratified, seeded); 0: all", low=0)
    labels: list = _f([], "label set for classification tasks; empty: the task's fixed set, else the training "
                      "data's labels", kind=str)
    columns: dict = _f({}, "task field -> column of your data, e.g. { text = \"content\", label = \"category\" }; "
                       "fields: `ftkit tasks show NAME`", kind=str)
    label_map: dict = _f({}, "your data's label -> the task's label, e.g. { happiness = \"喜悅\" }; integer labels "
                         "map through the dataset's own label names when it has them", kind=str)
    drop_labels: list = _f([], "labels (as in your data) whose rows are skipped on purpose; counted, not warned "
                           "per row", kind=str)
    group_by: str = _f("", "column whose rows always land in the same split (e.g. a question id); empty: the "
                       "task's default")
    options: dict = _f({}, "task-specific options, see `ftkit tasks show NAME`")


@dataclass
class MethodSection:
    name: str = _f("lora", "qlora (4-bit base + LoRA), lora, or full fine-tuning", choices=("qlora", "lora", "full"))
    r: int = _f(8, "LoRA rank", low=1)
    alpha: int = _f(16, "LoRA alpha (scaling = alpha / r)", low=1)
    dropout: float = _f(0.05, "LoRA dropout", low=0.0, high=0.9)
    target_modules: list = _f([], "modules LoRA adapts; empty: peft's default for the architecture", kind=str)


@dataclass
class TrainSection:
    head: str = _f("auto", "classifier: a sequence-classification head; causal: generate the label/reply; "
                   "auto: the task's default", choices=("auto", "classifier", "causal"))
    epochs: float = _f(3.0, "passes over the training data", low=0.0, low_open=True)
    max_steps: int = _f(-1, "stop after this many optimizer steps; -1: run all epochs", low=-1)
    lr: float = _f(2e-4, "peak learning rate", low=0.0, low_open=True, high=1.0)
    batch_size: int = _f(4, "examples per device per step", low=1)
    grad_accum: int = _f(1, "gradient accumulation steps (effective batch = batch_size x grad_accum)", low=1)
    warmup: float = _f(0.03, "warm-up: a fraction of all steps if < 1, else a number of steps", low=0.0)
    scheduler: str = _f("cosine", "learning-rate schedule",
                        choices=("linear", "cosine", "constant", "constant_with_warmup"))
    weight_decay: float = _f(0.0, "AdamW weight decay", low=0.0)
    optim: str = _f("adamw", "optimizer: adamw (two fp32 states per trainable parameter), adamw_8bit (bitsandbytes' "
                    "8-bit states: 2 bytes instead of 8), paged_adamw_8bit (8-bit, paged out to CPU memory under "
                    "pressure on CUDA); `ftkit estimate --optim` counts each",
                    choices=("adamw", "adamw_8bit", "paged_adamw_8bit"))
    max_seq_len: int = _f(256, "truncate examples to this many tokens", low=8)
    activation_checkpointing: bool = _f(False, "recompute activations in backward to save memory (~20% slower)")
    seed: int = _f(42, "seed for sampling, splitting, initialization and data order", low=0)
    valid_size: float = _f(0.0, "fraction of the training data (after the test split) held out for validation, "
                           "split like the test set (stratified, grouped, seeded); 0: no validation unless "
                           "`task.valid_file`", low=0.0, high=0.5)
    eval_steps: int = _f(0, "with a validation set: evaluate it every N optimizer steps (and at the last step) "
                         "with the task's headline metric (perplexity for generation tasks); 0: at each epoch's "
                         "end", low=0)
    early_stopping_patience: int = _f(0, "with a validation set: stop when the validation metric has not improved "
                                      "for this many evaluations; 0: never stop early", low=0)
    keep: str = _f("auto", "which weights are saved: the validation-best step's, or the last step's; auto: best "
                   "with a validation set, else last", choices=("auto", "best", "last"))
    logging_steps: int = _f(10, "log the training loss every N steps", low=1)
    save_minutes: float = _f(10.0, "save a checkpoint every this many minutes of training, besides the one at "
                             "each epoch's end; the newest two are kept, and `ftkit run --resume` continues from the "
                             "newest complete one; 0: none by time", low=0.0)
    save_steps: int = _f(0, "save a checkpoint every N optimizer steps too; 0: none by steps (still at each epoch's "
                         "end and every `save_minutes`)", low=0)
    deepspeed: str = _f("", "DeepSpeed config (JSON, e.g. ZeRO stage 2), relative to the recipe, passed to the "
                        "Trainer as is; needs `pip install deepspeed`, CUDA and a launcher (torchrun, accelerate "
                        "launch, ftkit run --nproc), see docs/distributed.md; empty: plain DDP", path=True)


@dataclass
class EvalSection:
    baseline: bool = _f(True, "evaluate the base model too, on the same test split")
    batch_size: int = _f(16, "evaluation batch size", low=1)
    max_examples: int = _f(0, "evaluate on at most this many test examples; 0: all", low=0)
    max_new_tokens: int = _f(64, "generation: longest reply", low=1)
    do_sample: bool = _f(False, "generation: sample instead of greedy decoding")
    temperature: float = _f(0.7, "generation: sampling temperature", low=0.0, low_open=True)
    top_p: float = _f(0.9, "generation: nucleus sampling mass", low=0.0, high=1.0, low_open=True)
    top_k: int = _f(50, "generation: sample among the top k tokens", low=0)
    repetition_penalty: float = _f(1.0, "generation: > 1 discourages repeats", low=0.0, low_open=True)
    label_score: str = _f("sum", "causal head, classification: a label's score is the sum of its answer tokens' "
                          "log-probs; their mean (length-normalised: long labels are not penalised); or "
                          "constrained: its probability when the model may only spell a label (each token "
                          "renormalised over the tokens that continue some label). constrained is the fastest "
                          "with many labels (tokens the label set forces cost nothing) and suits labels that "
                          "differ at their first token (A/B/C), but it ignores the probability the model puts "
                          "outside the labels, and scored word labels less accurately than sum (BENCHMARKS.md)",
                          choices=LABEL_SCORES)
    calibrate: bool = _f(False, "causal head, classification: subtract each label's log-prob after the content-free "
                         "input `N/A` (contextual calibration, Zhao et al. 2021), removing the model's bias for labels")
    showcase: list = _f([], "hand-written inputs report.md ends with, and what the zero-shot base model and the "
                        "fine-tuned one answer to each (not scored)", kind=str)


@dataclass
class OutputSection:
    dir: str = _f(help="run folder to create (refused if it exists, unless --overwrite)", path=True)


@dataclass
class Recipe:
    """A validated recipe; ``path`` is the file it came from (paths are already resolved)."""

    model: ModelSection
    task: TaskSection
    method: MethodSection
    train: TrainSection
    eval: EvalSection
    output: OutputSection
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


SECTIONS: dict[str, type] = {
    "model": ModelSection, "task": TaskSection, "method": MethodSection,
    "train": TrainSection, "eval": EvalSection, "output": OutputSection,
}
REQUIRED = {"model", "task", "output"}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else f"; known: {', '.join(options)}"


# Field annotations are strings under `from __future__ import annotations`.
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _check_value(key: str, spec, value: Any, errors: list[str]) -> Any:
    """The value converted to the field's type, or None after appending an error."""
    want = _TYPES[spec.type] if isinstance(spec.type, str) else spec.type
    meta = spec.metadata
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        errors.append(f"{key}: expected {_type_name(want())}, got {_type_name(value)} {value!r}")
        return None
    if want is list and meta["kind"] and not all(isinstance(v, meta["kind"]) for v in value):
        errors.append(f"{key}: expected a list of strings, got {value!r}")
        return None
    if want is dict and meta["kind"]:
        wrong = [k for k, v in value.items() if not isinstance(v, meta["kind"])]
        if wrong:
            errors.append(f"{key}.{wrong[0]}: expected a string, got {_type_name(value[wrong[0]])} {value[wrong[0]]!r}")
            return None
    if meta["choices"] and value not in meta["choices"]:
        errors.append(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
        return None
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        bound = f"greater than {low:g}" if meta["low_open"] else f"at least {low:g}"
        errors.append(f"{key}: must be {bound}, got {value!r}")
        return None
    if high is not None and value > high:
        errors.append(f"{key}: must be at most {high:g}, got {value!r}")
        return None
    return value


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a parsed recipe; raise ConfigError listing every problem."""
    errors: list[str] = []
    for name in data:
        if name not in SECTIONS:
            errors.append(f"{name}: unknown section{_suggest(name, list(SECTIONS))}")
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name)
        if raw is None:
            if name in REQUIRED:
                errors.append(f"{name}: missing section [{name}]")
            raw = {}
        if not isinstance(raw, dict):
            errors.append(f"{name}: must be a table [{name}], got {_type_name(raw)}")
            raw = {}
        specs = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in specs:
                errors.append(f"{name}.{key}: unknown key{_suggest(key, list(specs))}")
                continue
            checked = _check_value(f"{name}.{key}", specs[key], value, errors)
            if checked is not None:
                if specs[key].metadata["path"] and checked and base_dir is not None:
                    checked = str((base_dir / checked).resolve())
                values[key] = checked
        if name == "model" and base_dir is not None and _names_gguf_file(values):
            # Resolved now, like every other path: a run's saved recipe must not depend on where it is read.
            values["id"] = str((base_dir / Path(values["id"]).expanduser()).resolve())
        for key, spec in specs.items():
            required = spec.default is MISSING and spec.default_factory is MISSING
            if required and key not in values:
                if name in data and not any(e.startswith(f"{name}.{key}:") for e in errors):
                    errors.append(f"{name}.{key}: missing; {spec.metadata['help']}")
                values[key] = ""
        built[name] = cls(**values)
    reported = {e.split(":", 1)[0] for e in errors}
    errors += [e for e in _cross_checks(built, errors) if e.split(":", 1)[0] not in reported]
    if errors:
        raise ConfigError(source, errors)
    return Recipe(**built)


def _cross_checks(sections: dict[str, Any], found: list[str]) -> list[str]:
    """Checks that span keys, and the task's own options (skipping keys already reported)."""
    from ftkit.plugins import registered_tasks

    errors: list[str] = []
    tasks = registered_tasks()
    task_name = sections["task"].name
    if not task_name or any(e.startswith("task.name:") for e in found):
        pass
    elif task_name not in tasks:
        errors.append(f"task.name: unknown task {task_name!r}{_suggest(task_name, list(tasks))}")
    else:
        task = tasks[task_name][0]
        for key in sections["task"].options:
            if key not in task.options:
                known = list(task.options) or ["(this task takes none)"]
                errors.append(f"task.options.{key}: unknown option for {task_name}{_suggest(key, known)}")
        if sections["task"].labels and task.kind != "classification":
            errors.append(f"task.labels: {task_name} is a {task.kind} task; labels are for classification")
        from ftkit.sources import DataMapping, mapping_errors

        errors += mapping_errors(task, DataMapping.from_section(sections["task"]))
        if sections["train"].head == "classifier" and task.kind != "classification":
            errors.append(f"train.head: classifier needs a classification task; {task_name} is {task.kind}")
        if not sections["task"].train_file and not task.hub_dataset:
            errors.append(f"task.train_file: missing; {task_name} has no hub dataset, so name a data file")
    errors += _model_errors(sections["model"], found)
    deepspeed = sections["train"].deepspeed
    if deepspeed and not any(e.startswith("train.deepspeed:") for e in found):
        errors += _deepspeed_errors(Path(deepspeed))
    if sections["method"].name == "full" and sections["method"].target_modules:
        errors.append("method.target_modules: only for lora and qlora; full fine-tuning trains every weight")
    errors += _validation_errors(sections["task"], sections["train"])
    return errors


def _validation_errors(task: TaskSection, train: TrainSection) -> list[str]:
    """The validation keys need a validation set, and it must be one set, apart from the test data."""
    if task.valid_file and train.valid_size:
        return ["train.valid_size: give task.valid_file or train.valid_size, not both"]
    if task.valid_file and task.valid_file in (task.test_file, task.train_file):
        which = "test_file" if task.valid_file == task.test_file else "train_file"
        return [(f"task.valid_file: the same file as task.{which}; validation needs examples of its own (or use "
                 "train.valid_size to carve them from the training data)")]
    if task.valid_file or train.valid_size:
        return []
    fix = "set task.valid_file or train.valid_size"
    return [f"train.{key}: {why} needs a validation set; {fix}" for key, why, on in (
        ("keep", '"best"', train.keep == "best"),
        ("early_stopping_patience", "early stopping", train.early_stopping_patience > 0),
        ("eval_steps", "evaluating during training", train.eval_steps > 0),
    ) if on]


#: Models ``model.source = "builtin"`` provides (see ftkit/tiny.py and ftkit/gguf.py).
BUILTIN_MODELS = ("ftkit/tiny-qwen2", "ftkit/smollm2-135m-instruct")


def _names_gguf_file(model: dict[str, Any]) -> bool:
    source, model_id = model.get("source", "modelscope"), model.get("id", "")
    return bool(model_id) and (source == "gguf" or (source == "local" and model_id.lower().endswith(".gguf")))


def _model_errors(model: ModelSection, found: list[str]) -> list[str]:
    """A builtin id must exist; a GGUF file must be there and be one (its header is read, nothing loaded)."""
    if any(e.startswith(("model.id:", "model.source:")) for e in found) or not model.id:
        return []
    if model.source == "builtin" and model.id not in BUILTIN_MODELS:
        return [f"model.id: {model.id!r} is not a builtin model{_suggest(model.id, list(BUILTIN_MODELS))}"]
    if _names_gguf_file({"source": model.source, "id": model.id}):
        from ftkit.errors import ModelError
        from ftkit.gguf import read_gguf_info

        try:
            read_gguf_info(Path(model.id))
        except ModelError as error:
            return [error.message]
    return []


def _deepspeed_errors(path: Path) -> list[str]:
    """A DeepSpeed config must exist and be JSON; stage 3 is refused (see the message)."""
    import json

    if not path.is_file():
        return [(f"train.deepspeed: {path} does not exist; give the DeepSpeed JSON config's path, relative to "
                 "the recipe")]
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as error:
        return [f"train.deepspeed: {path} is not valid JSON ({error})"]
    if not isinstance(config, dict):
        return [f"train.deepspeed: {path} must hold a JSON object (a DeepSpeed config)"]
    zero = config.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("stage") == 3:
        return [(f"train.deepspeed: {path} uses ZeRO stage 3, which shards the weights themselves; ftkit "
                 "evaluates and saves whole weights on each rank, so use stage 1 or 2")]
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=2e-5`` -> (["train", "lr"], 2e-05); the value is read as TOML, else taken as a string."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UsageError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. --set train.lr=2e-5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, override (``--set``) and validate a recipe file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such recipe file (see recipes/ for examples)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, expected a .toml recipe") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text ({error.reason}); re-save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    for override in overrides:
        (section, key), value = parse_override(override)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise UsageError(f"--set {override!r}: [{section}] is not a table in {path}")
        table[key] = value
    recipe = recipe_from_dict(data, str(path), base_dir=path.resolve().parent)
    recipe.path = path
    return recipe
