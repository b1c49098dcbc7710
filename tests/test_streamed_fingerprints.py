"""The card's fingerprints of the weights come from the merge's own reads: one read per file."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

import mwakit
from mwakit import card

from .test_execute import _recipe, write_adapter


def _card_digests(out: Path) -> dict[str, str]:
    text = (out / "README.md").read_text()
    rows = re.findall(r"^\| (\S+) \| (\S+) \| \d+ \| `([0-9a-f]{64})` \|$", text, re.M)
    return {f"{c}/{f}": h for c, f, h in rows}


def test_weights_are_hashed_from_the_merge_reads_not_reread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MWAKIT_CACHE", "off")
    folders = [tmp_path / f"c{i}" for i in range(3)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=5, seed=i, loss=1.0 + i)
    real = card.sha256_file

    def no_weights(path: Path) -> str:
        assert not path.name.endswith(".safetensors"), f"{path} was read a second time"
        return real(path)

    monkeypatch.setattr(card, "sha256_file", no_weights)
    out = mwakit.run(_recipe(tmp_path, folders, method="linear")).path
    got = _card_digests(out)
    for f in folders:
        for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
            assert got[f"{f.name}/{name}"] == hashlib.sha256((f / name).read_bytes()).hexdigest()


def test_streamed_digests_fill_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MWAKIT_CACHE", str(tmp_path / "cache"))
    folders = [tmp_path / f"c{i}" for i in range(2)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=3, seed=i)
    mwakit.run(_recipe(tmp_path, folders, method="linear"))
    w = folders[0] / "adapter_model.safetensors"
    assert card.known_digest(w) == hashlib.sha256(w.read_bytes()).hexdigest()
    # A second run knows every digest: nothing is streamed, the card is the same.
    plan = mwakit.plan(_recipe(tmp_path, folders, method="linear"))
    from mwakit.api import streamed_files

    assert streamed_files(plan) == []
