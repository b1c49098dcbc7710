"""Numbers and modes written as a person would write them, for the CLI and the model card."""

from __future__ import annotations

from collections.abc import Mapping


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 checkpoint``, ``2 checkpoints`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def size(n: float) -> str:
    """A byte count in decimal units: ``512 B``, ``24.6 kB``, ``13.1 MB``, ``2.20 GB``.

    Small outputs (a LoRA adapter of a tiny model) no longer read as ``0.0 MB``.
    """
    if n < 1000:
        return f"{int(n)} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < scale * 1000 or unit == "GB":
            v = n / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def ranks(counts: Mapping[int | str, int]) -> str:
    """LoRA ranks and how many modules have each: ``rank 4 (14 modules)``,
    ``ranks 4 (10 modules), 8 (4 modules)``."""
    items = sorted((int(r), n) for r, n in counts.items())
    if not items:
        return "no LoRA modules"
    parts = [f"{r} ({plural(n, 'module')})" for r, n in items]
    return ("rank " if len(items) == 1 else "ranks ") + ", ".join(parts)


def lora_space(kind: str, mode: str, delta_rank: object = None) -> str | None:
    """The LoRA space of a plan in words, or None for full models (they have none).

    Args:
        kind: The plan's kind, ``adapter`` or ``full``.
        mode: The plan's ``lora_mode``: ``factors``, ``concat``, ``svd``, ``dense``, ``full``.
        delta_rank: The recipe's ``delta_rank`` (the output rank of ``svd`` and ``dense``).
    """
    if kind == "full":
        return None
    return {
        "factors": "factors (A and B merged, same rank)",
        "concat": "delta (exact: ranks concatenated)",
        "svd": f"delta (re-factorised to rank {delta_rank} with QR + small SVD)",
        "dense": f"delta (dense ΔW re-factorised to rank {delta_rank} with a truncated SVD)",
        "full": "delta (exact ΔW stored as full-rank factors)",
    }.get(mode, mode)


def count(n: int) -> str:
    """A large count in short form: ``512``, ``26.8 k``, ``1.10 B``."""
    if n < 1000:
        return str(n)
    for unit, scale in (("k", 1e3), ("M", 1e6), ("B", 1e9)):
        if n < scale * 1000 or unit == "B":
            v = n / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
