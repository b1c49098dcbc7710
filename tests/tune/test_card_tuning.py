"""The model card's Tuning section, from a recipe's `tuning:` block."""

from __future__ import annotations

from mwakit.card import tuning_lines


def test_tuning_section_lists_data_and_results() -> None:
    block = {
        "tool": "mwakit 0.1.0 tune",
        "metric": "loss",
        "data": {"val": {"path": "/d/val.jsonl", "sha256": "ab" * 32, "rows": 200}},
        "chosen": "uniform",
        "reason": "chose uniform: the best on VAL",
        "results": {
            "chosen": {"name": "uniform", "val": 1.2345678, "val_se": 0.0123, "test": None},
            "last": {
                "name": "checkpoint-40",
                "val": 1.5,
                "val_se": None,
                "test": 1.6,
                "test_se": 0.02,
            },
        },
    }
    text = "\n".join(tuning_lines(block))
    assert text.startswith("\n## Tuning\n")
    assert "metric `loss`: chose uniform: the best on VAL" in text
    assert f"| val | `val.jsonl` | 200 | `{'ab' * 32}` |" in text
    assert "| chosen | uniform | 1.2346 ± 0.012 | — |" in text
    assert "| last | checkpoint-40 | 1.5000 | 1.6000 ± 0.02 |" in text
    assert "TEST was not used to choose" in text


def test_no_block_no_section() -> None:
    assert tuning_lines(None) == [] and tuning_lines({}) == []
    # A hand-edited block with odd values still renders instead of failing the merge.
    assert "## Tuning" in "\n".join(tuning_lines({"data": {"val": "x"}, "results": {"a": 3}}))
