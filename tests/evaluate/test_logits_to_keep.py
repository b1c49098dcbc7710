"""The output head computed only at scored positions gives the scores of the full logits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mwakit.evaluate import Evaluator, load_rows
from mwakit.evaluate.target import resolve_target

from ..conftest import MakeAdapter
from .conftest import WORDS

METRICS = ("loss", "perplexity", "exact_match", "accuracy")


def _data(path: Path) -> Path:
    rng = random.Random(3)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    lines = []
    for i in range(18):
        if i % 3 == 0:  # EOS-ended answers: the exact-match shortcut reads the argmax
            lines.append({"prompt": words(rng.randint(1, 9)), "completion": words(2) + " </s>"})
        elif i % 3 == 1:
            lines.append({"text": words(rng.randint(2, 12))})
        else:
            lines.append(
                {"prompt": words(rng.randint(1, 6)), "choices": [words(1), words(3)], "label": 1}
            )
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("batch_tokens", [2048, 24])  # one batch, and many of mixed widths
def test_trimmed_head_scores_equal_the_full_logits(
    tok_base: Path, make_adapter: MakeAdapter, tmp_path: Path, batch_tokens: int
) -> None:
    rows = load_rows(_data(tmp_path / "d.jsonl"))
    adapter = resolve_target(make_adapter(tmp_path / "a", seed=5)).adapter
    trimmed = Evaluator(tok_base, metrics=METRICS, batch_tokens=batch_tokens)
    full = Evaluator(tok_base, metrics=METRICS, batch_tokens=batch_tokens)
    assert trimmed.trim_logits, "transformers' Llama takes logits_to_keep"
    full.trim_logits = False
    for target in (None, adapter):
        a, b = trimmed.score(rows, target), full.score(rows, target)
        assert a.tokens == b.tokens > 0
        for m in METRICS:
            assert a.per_row[m] == pytest.approx(b.per_row[m], abs=1e-6, rel=1e-6), m
            assert a.metrics[m] == pytest.approx(b.metrics[m], abs=1e-6, rel=1e-6), m
        assert a.per_row["exact_match"] == b.per_row["exact_match"]
        assert a.per_row["accuracy"] == b.per_row["accuracy"]
