"""`load_rows`: the four formats, and what is skipped or refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mwakit.errors import DataError
from mwakit.evaluate import Row, load_rows


def test_four_formats_blank_lines_and_extra_keys(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"prompt": "Q", "completion": " A", "id": 7}\n'
        "\n"
        '{"text": "T"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo"}]}\n'
        "   \n"
        '{"prompt": "P", "choices": ["x", "y"], "label": 1, "source": "arc"}\n',
        encoding="utf-8",
    )
    rows = load_rows(f)
    assert rows == [
        Row("completion", f"{f}:1", prompt="Q", completion=" A"),
        Row("text", f"{f}:3", text="T"),
        Row("messages", f"{f}:4", messages=(("user", "hi"), ("assistant", "yo"))),
        Row("choice", f"{f}:6", prompt="P", choices=("x", "y"), label=1),
    ]
    assert len({*rows}) == 4  # hashable: the tokenisation cache keys on them


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the data file has no rows"):
        load_rows(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="cannot read the data file"):
        load_rows(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="data file not found"):
        load_rows(tmp_path / "missing.jsonl")


def test_label_must_be_an_int_not_a_bool(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "P", "choices": ["x", "y"], "label": true}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: \"label\" must be an index"):
        load_rows(f)


def test_the_api_imports_light() -> None:
    # tune imports these at start-up: torch, transformers and peft wait for an Evaluator.
    code = (
        "import sys, mwakit.evaluate, mwakit.memory\n"
        "from mwakit.evaluate import load_rows, metric_direction, parse_metrics\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
