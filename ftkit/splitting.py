"""One train/test split for ``ftkit run`` and ``ftkit data split``: stratified, grouped, seeded.

Rows that share a group (the recipe's ``group_by`` column, HC3's question, SQuAD's paragraph, or
simply the source record a row came from) always land on the same side, so no question or
paragraph is both trained on and tested. Classification splits keep the class proportions.
The same data, test size and seed give the same split whichever command asks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ftkit.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from ftkit.sources import TaskData


def split_indices(data: TaskData, test_size: float, seed: int, *, stratify: bool,
                  what: str = "task.test_size") -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and test (each sorted)."""
    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split

    n = len(data)
    if n < 2:
        raise DataError(f"{data.source}: {n} usable example(s); a split needs at least 2")
    if not 0 < test_size < 1:
        raise DataError(f"{what}: must be between 0 and 1, got {test_size}")
    table = data.table
    groups = np.asarray(table.column("_group").to_numpy(zero_copy_only=False))
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False)) if stratify else None
    _, group_ids = np.unique(groups, return_inverse=True)
    grouped = group_ids.max() + 1 < n
    index = np.arange(n)
    if labels is not None:
        _check_stratifiable(labels, n, test_size, what, grouped)
    if grouped and labels is not None:
        folds = max(2, round(1 / test_size))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        try:
            train, test = next(splitter.split(index, labels, group_ids))
        except ValueError as error:
            raise DataError(f"{what}: cannot split {n} examples in {group_ids.max() + 1} groups: {error}") from None
    elif grouped:
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train, test = next(splitter.split(index, groups=group_ids))
    else:
        try:
            train, test = train_test_split(index, test_size=test_size, random_state=seed, stratify=labels)
        except ValueError as error:  # too few examples for a split of that size
            raise DataError(f"{what}: cannot split {n} examples: {error}") from None
    if labels is not None:
        missing = sorted(set(labels[train]) - set(labels[test]))
        if missing:
            raise DataError(f"{data.source}: label(s) {', '.join(missing)} would be missing from the test split "
                            f"(rows are kept together by group); add examples or raise {what}")
    if not len(train) or not len(test):
        raise DataError(f"{what}: a {test_size:.0%} split of {n} examples leaves one side empty; change it or add data")
    return np.sort(train), np.sort(test)


def _check_stratifiable(labels: np.ndarray, n: int, test_size: float, what: str, grouped: bool) -> None:
    import numpy as np

    names, counts = np.unique(labels, return_counts=True)
    rare = sorted(str(name) for name, count in zip(names, counts) if count < 2)
    if rare:
        raise DataError(f"label(s) {', '.join(rare)} have fewer than 2 examples: a stratified split would leave "
                        "them out of train or test; add examples or give task.test_file")
    classes, n_test = len(names), math.ceil(test_size * n)
    if not grouped and (n_test < classes or n - n_test < classes):
        raise DataError(f"{what}: a {test_size:.0%} split of {n} examples gives {n_test} test and {n - n_test} "
                        f"train examples; each needs at least one of the {classes} classes, so change test_size "
                        "or add data")


def sample_indices(data: TaskData, n: int, seed: int, *, stratify: bool) -> np.ndarray:
    """At most ``n`` row indices, keeping the class proportions (seeded)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    total = len(data)
    if n <= 0 or n >= total:
        return np.arange(total)
    labels = data.table.column("label").to_numpy(zero_copy_only=False) if stratify else None
    try:
        kept, _ = train_test_split(np.arange(total), train_size=n, random_state=seed, stratify=labels)
    except ValueError:  # a class too rare to keep in proportion: fall back to a plain sample
        kept, _ = train_test_split(np.arange(total), train_size=n, random_state=seed)
    return np.sort(kept)
