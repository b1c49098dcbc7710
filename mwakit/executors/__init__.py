"""Executors: where a plan's tensor groups run.

``local`` (the default) is `mwakit.execute.execute`: this process streams every group in turn
(a linear factor average of LoRA adapters runs in `mwakit.executors.factors` instead, with
NumPy and without importing torch: the same bytes).
``ray`` (`mwakit.executors.ray`) runs the groups of each output shard as one Ray task on a
cluster whose nodes share the input and output storage. Both write the same bytes.
"""

from __future__ import annotations

EXECUTORS = ("local", "ray")


def parse_executor(text: str) -> tuple[str, str | None]:
    """``local``, ``ray`` or ``ray=ADDRESS`` (the ``--executor`` option) → (name, address).

    Raises:
        UsageError: Another executor, or an address for ``local``.
    """
    from mwakit.errors import UsageError

    name, sep, address = text.partition("=")
    name = name.strip()
    if name not in EXECUTORS or (sep and (name != "ray" or not address.strip())):
        raise UsageError(
            f"unknown executor {text!r}",
            where="--executor",
            fix="use local, ray, or ray=ADDRESS (e.g. ray=auto, ray=ray://head:10001)",
        )
    return name, address.strip() or None
