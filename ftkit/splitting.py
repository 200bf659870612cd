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
from ftkit.readers import system_allocator

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from ftkit.sources import TaskData


@system_allocator()
def split_indices(data: TaskData, test_size: float, seed: int, *, stratify: bool,
                  what: str = "task.test_size") -> tuple[np.ndarray, np.ndarray]:
    """Row indices of train and test (each sorted).

    Ungrouped rows are split here with numpy (a seeded shuffle within each class, the test share
    of each class by largest remainder, at least one row of every class on each side): scikit-learn
    costs seconds to import and a dozen row-sized arrays, which a 200,000-row file notices. Grouped
    rows go through scikit-learn's StratifiedGroupKFold / GroupShuffleSplit.
    """
    import numpy as np
    import pyarrow.compute as pc

    n = len(data)
    if n < 2:
        raise DataError(f"{data.source}: {n} usable example(s); a split needs at least 2")
    if not 0 < test_size < 1:
        raise DataError(f"{what}: must be between 0 and 1, got {test_size}")
    table = data.table
    # Integer codes in the order np.unique would give (so the split is the same), without turning
    # every row's group and label into a Python string.
    # Rows of one source record stay together (HC3's answers to one question); so do rows sharing
    # the group_by column, where there is one.
    if "_group" in table.column_names:
        _, group_ids = _sorted_codes(table.column("_group"))
        grouped = group_ids.max() + 1 < n
    else:  # source records, in order: several rows per record only where a record gave several
        rows = table.column("_row")
        # Compared in Arrow (a bit per row), not as a row-sized numpy copy of the column.
        grouped = n > 1 and not pc.all(pc.greater(rows.slice(1), rows.slice(0, n - 1))).as_py()
        group_ids = np.unique(rows.to_numpy(), return_inverse=True)[1] if grouped else None
    label_values, labels = _sorted_codes(table.column("label")) if stratify else (None, None)
    label_names = label_values.to_pylist() if stratify else []
    index = np.arange(n) if grouped else None
    if labels is not None:
        _check_stratifiable(label_names, labels, n, test_size, what, grouped)
    if grouped and labels is not None:
        from sklearn.model_selection import StratifiedGroupKFold

        folds = max(2, round(1 / test_size))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        try:
            train, test = next(splitter.split(index, labels, group_ids))
        except ValueError as error:
            raise DataError(f"{what}: cannot split {n} examples in {group_ids.max() + 1} groups: {error}") from None
    elif grouped:
        from sklearn.model_selection import GroupShuffleSplit

        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train, test = next(splitter.split(index, groups=group_ids))
    else:
        chosen = _stratified_pick(labels if labels is not None else np.zeros(n, dtype=np.int64),
                                  math.ceil(test_size * n), seed, at_least_one=labels is not None)
        test_mask = np.zeros(n, dtype=bool)
        test_mask[chosen] = True
        train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)  # sorted already
    if grouped and labels is not None:  # the ungrouped draw keeps every class on both sides by construction
        missing = [str(label_names[code]) for code in np.setdiff1d(labels[train], labels[test])]
        if missing:
            raise DataError(f"{data.source}: label(s) {', '.join(missing)} would be missing from the "
                            f"{_held_out(what)} split (rows are kept together by group); add examples or raise {what}")
    if not len(train) or not len(test):
        raise DataError(f"{what}: a {test_size:.0%} split of {n} examples leaves one side empty; change it or add data")
    return (np.sort(train), np.sort(test)) if grouped else (train, test)


def _sorted_codes(column) -> tuple[pa.Array, np.ndarray]:  # noqa: ANN001 - a pyarrow (Chunked)Array
    """The distinct values, sorted, and each row's index into them: ``np.unique(..., return_inverse=True)``.

    Arrow hashes the rows and sorts only the distinct values (np.unique sorts every row's Python object).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(column, null_encoding="encode").combine_chunks()
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    # A dictionary column (labels) may list values no row holds any more (after a take): keep the used.
    used = np.flatnonzero(np.bincount(indices, minlength=len(encoded.dictionary)))
    values = encoded.dictionary.take(pa.array(used))
    order = pc.array_sort_indices(values, null_placement="at_end").to_numpy()
    # Each dictionary entry's rank among the used values, then one lookup per row: a single
    # row-sized int32 array (a 200,000-row file notices every row-sized temporary).
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    code_of = np.full(len(encoded.dictionary), -1, dtype=np.int32)
    code_of[used] = rank
    return values.take(pa.array(order)), code_of[indices]


def _held_out(what: str) -> str:
    """What the split holds out: the validation set for ``train.valid_size``, else the test set."""
    return "validation" if what == "train.valid_size" else "test"


def _check_stratifiable(names: list, labels: np.ndarray, n: int, test_size: float, what: str, grouped: bool) -> None:
    import numpy as np

    held = _held_out(what)
    key = "valid" if held == "validation" else "test"  # task.valid_file / train.valid_size, task.test_*
    counts = np.bincount(labels, minlength=len(names))
    rare = sorted(str(name) for name, count in zip(names, counts) if count < 2)
    if rare:
        raise DataError(f"label(s) {', '.join(rare)} have fewer than 2 examples: a stratified split would leave "
                        f"them out of train or {held}; add examples or give task.{key}_file")
    classes, n_test = len(names), math.ceil(test_size * n)
    if not grouped and (n_test < classes or n - n_test < classes):
        raise DataError(f"{what}: a {test_size:.0%} split of {n} examples gives {n_test} {held} and {n - n_test} "
                        f"train examples; each needs at least one of the {classes} classes, so change "
                        f"{key}_size or add data")


def _stratified_pick(codes: np.ndarray, k: int, seed: int, *, at_least_one: bool) -> np.ndarray:
    """``k`` row indices drawn (seeded) so that each class gets its share, by largest remainder.

    With ``at_least_one`` every class keeps at least one row on both sides (classes of two or more).
    """
    import numpy as np

    n = len(codes)
    counts = np.bincount(codes)
    exact = counts * (k / n)
    take = np.floor(exact).astype(np.int64)
    if at_least_one:
        take = np.clip(take, np.minimum(1, counts - 1), np.maximum(counts - 1, 0))
    # Hand out what is left (or take back what is over) by the largest (smallest) remainder.
    while take.sum() != k:
        room = (take < counts - (1 if at_least_one else 0)) if take.sum() < k else (take > (1 if at_least_one else 0))
        if not room.any():
            break
        score = np.where(room, exact - take, np.inf if take.sum() > k else -np.inf)
        pick = int(np.argmax(score)) if take.sum() < k else int(np.argmin(score))
        take[pick] += 1 if take.sum() < k else -1
    # Class by class (the rows of one class, a seeded draw among them): no row-sized temporaries.
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(codes == c), size=t, replace=False) for c, t in enumerate(take) if t]
    return np.concatenate(picked) if picked else np.array([], dtype=np.int64)


def sample_indices(data: TaskData, n: int, seed: int, *, stratify: bool) -> np.ndarray:
    """At most ``n`` row indices, keeping the class proportions (seeded)."""
    import numpy as np

    total = len(data)
    if n <= 0 or n >= total:
        return np.arange(total)
    codes = _sorted_codes(data.table.column("label"))[1] if stratify else np.zeros(total, dtype=np.int64)
    return np.sort(_stratified_pick(codes, n, seed, at_least_one=False))
