"""Reading public datasets from ModelScope or the Hugging Face hub.

Only called when a recipe names no local file; offline, it fails with a message that says to
point the recipe at a local copy.
"""

from __future__ import annotations

from typing import Any

from ftkit.errors import DataError


def load_hub_rows(spec: str, *, subset: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Rows of ``spec`` (``modelscope:ORG/NAME`` or ``huggingface:ORG/NAME``) as plain dicts."""
    source, _, dataset_id = spec.partition(":")
    try:
        if source == "modelscope":
            # MsDataset needs extras that modelscope[datasets] would pin datasets to 4.x; import lazily
            # so only users of hub data pay for (and need) it.
            from modelscope.msdatasets import MsDataset

            data = MsDataset.load(dataset_id, subset_name=subset, split=split)
            return [dict(row) for row in data]
        if source == "huggingface":
            import datasets

            return [dict(row) for row in datasets.load_dataset(dataset_id, subset, split=split)]
    except Exception as error:  # noqa: BLE001 - hub clients raise many unrelated types
        raise DataError(
            f"could not load {spec} (subset {subset!r}, split {split!r}) from the hub: "
            f"{type(error).__name__}: {error}; offline, download it elsewhere and set the task's "
            "data file in the recipe"
        ) from error
    raise DataError(f"unknown hub source {source!r} in {spec!r}: use modelscope:ORG/NAME or huggingface:ORG/NAME")
