"""Long evaluations say how far they are also when no terminal watches (CI logs, nohup, pipes)."""

from __future__ import annotations

import re

from ftkit import evaluator


def test_without_a_terminal_progress_is_a_plain_line_with_done_total_and_rate(monkeypatch, capsys):
    monkeypatch.setattr(evaluator, "PROGRESS_EVERY_S", 0.0)  # every batch, instead of every 10 s
    items = [[0] * n for n in (3, 1, 4, 1, 5, 9, 2)]
    seen = [index for chunk, _ in evaluator._batches(items, 2, len, "evaluating fine-tuned") for index in chunk]
    assert sorted(seen) == list(range(len(items)))  # every item once, longest first
    assert [len(items[i]) for i in seen] == sorted((len(i) for i in items), reverse=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("evaluating fine-tuned: 2/7 (29%), ")
    assert all(re.fullmatch(r"evaluating fine-tuned: \d/7 \(\d+%\), [\d.]+/s", line) for line in lines)
    assert len(lines) == 3  # after batches 1-3 of 4; the last one is the end, not progress


def test_progress_lines_are_rate_limited(capsys):
    list(evaluator._batches([[1]] * 50, 1, len, "evaluating base model"))
    assert capsys.readouterr().err == ""  # a fast evaluation prints nothing in between


def test_progress_can_be_turned_off(monkeypatch, capsys):
    monkeypatch.setattr(evaluator, "PROGRESS_EVERY_S", 0.0)
    token = evaluator.show_progress.set(False)
    try:
        seen = [i for chunk, _ in evaluator._batches([[1]] * 5, 1, len, "evaluating base model") for i in chunk]
    finally:
        evaluator.show_progress.reset(token)
    assert sorted(seen) == list(range(5)) and capsys.readouterr().err == ""
