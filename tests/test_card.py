"""Card helpers: input fingerprints are exact, cached per file version, and never stale."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from mwakit.card import _digest_cache, sha256_file

from .conftest import MakeAdapter, tiny_llama, trainer_state


def test_fingerprint_is_sha256_and_cached_per_file_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MWAKIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 3_000_000)
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f) == real
    cached = _digest_cache(f)
    assert cached is not None and cached.read_text() == real
    # The second call reads the cache, not the file: a planted digest comes back.
    planted = "0" * 64
    cached.write_text(planted)
    assert sha256_file(f) == planted
    # A new version of the file (size/mtime change) is hashed again.
    f.write_bytes(b"y" * 3_000_000)
    os.utime(f, ns=(1, 1))
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_cache_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MWAKIT_CACHE", "off")
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    assert _digest_cache(f) is None
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()


# -- the checkpoint table is valid Markdown for every kind of input --------------------------


def _tables(md: str) -> list[list[list[str]]]:
    """Every GitHub-flavoured Markdown table of a document, as rows of cells."""
    import re

    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.rstrip().endswith("|"), line
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


def _check_tables(md: str) -> list[list[list[str]]]:
    tables = _tables(md)
    assert tables
    for t in tables:
        header, sep, *rows = t
        assert all(c == "---" for c in sep), sep
        assert len(sep) == len(header) and all(len(r) == len(header) for r in rows), t
        assert all(header), header  # no empty header cell
    return tables


def _write_recipe(tmp: Path, **data: object) -> Path:
    import yaml

    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump({"device": "cpu", "output": {"path": str(tmp / "o")}, **data}))
    return p


def _card(recipe: Path, **kw: Any) -> str:
    from mwakit import api
    from mwakit.card import render_card

    return render_card(api.plan(recipe), "x: 1\n", {}, plot="weights.png", **kw)


def test_card_table_without_metrics(make_adapter: MakeAdapter, tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", seed=0)
    b = make_adapter(tmp_path / "b|c", seed=1)  # a pipe in a name cannot add a column
    md = _card(_write_recipe(tmp_path, method="linear", checkpoints=[str(a), str(b)]))
    table = _check_tables(md)[0]
    assert table[0] == ["checkpoint", "source", "revision", "step", "weight"]
    assert table[3][0] == "b\\|c" and table[3][-1] == "0.500000"
    assert "from 2 checkpoints" in md


def test_card_table_with_some_metrics(make_adapter: MakeAdapter, tmp_path: Path) -> None:
    state = trainer_state(10, [(10, 0.5)], evals=[(10, 0.7)])
    a = make_adapter(tmp_path / "checkpoint-10", seed=0, state=state)
    b = make_adapter(tmp_path / "plain", seed=1)
    md = _card(_write_recipe(tmp_path, method="linear", checkpoints=[str(a), str(b)]))
    header, _, first, second = _check_tables(md)[0]
    assert header == ["checkpoint", "source", "revision", "step", "loss", "eval_loss", "weight"]
    assert first[3:6] == ["10", "0.5", "0.7"] and second[3:6] == ["", "", ""]


def test_card_table_of_one_checkpoint_says_checkpoint(
    make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    a = make_adapter(tmp_path / "a", seed=0)
    md = _card(_write_recipe(tmp_path, method="linear", checkpoints=[str(a)]))
    _check_tables(md)
    assert "from 1 checkpoint with" in md and "1 checkpoints" not in md


def test_card_of_full_models_names_the_base_once(tmp_path: Path) -> None:
    for name in ("base", "m0", "m1"):
        tiny_llama().save_pretrained(tmp_path / name)
    r = _write_recipe(
        tmp_path,
        method="task_arithmetic",
        base_model=str(tmp_path / "base"),
        checkpoints=[str(tmp_path / "m0"), str(tmp_path / "m1")],
    )
    md = _card(r, fingerprints=[("m0", "model.safetensors", "0" * 64, 10)])
    tables = _check_tables(md)
    assert len(tables) == 2 and tables[1][0] == ["checkpoint", "file", "bytes", "sha256"]
    assert md.count("- Base model") == 1
    assert f"- Base model (θ_0 of the task vectors): `{tmp_path / 'base'}`" in md
    assert "(factors)" not in md and "LoRA space" not in md


def test_card_table_of_hub_sources(make_adapter: MakeAdapter, tmp_path: Path) -> None:
    import dataclasses

    from mwakit import api
    from mwakit.card import render_card

    a = make_adapter(tmp_path / "checkpoint-5", seed=0)
    b = make_adapter(tmp_path / "checkpoint-9", seed=1)
    p = api.plan(_write_recipe(tmp_path, method="linear", checkpoints=[str(a), str(b)]))
    sha = "a" * 40
    hub = tuple(
        dataclasses.replace(c, ref=f"hf://org/run/{c.name}", revision=sha) for c in p.checkpoints
    )
    md = render_card(dataclasses.replace(p, checkpoints=hub), "x: 1\n", {})
    _, _, *rows = _check_tables(md)[0]
    assert [r[1:4] for r in rows] == [
        ["`hf://org/run/checkpoint-5`", f"`{sha}`", "5"],
        ["`hf://org/run/checkpoint-9`", f"`{sha}`", "9"],
    ]


def test_markdown_table_refuses_a_ragged_row() -> None:
    from mwakit.card import markdown_table

    assert markdown_table(["a", "b"], [["1", "x|y"]]) == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    with pytest.raises(ValueError, match="row of 1 cells under a header of 2"):
        markdown_table(["a", "b"], [["1"]])
