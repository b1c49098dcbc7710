"""Card helpers: input fingerprints are exact, cached per file version, and never stale."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mwakit.card import _digest_cache, sha256_file


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
