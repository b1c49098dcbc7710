"""Evaluation rows: JSONL in the formats TRL users already have, checked line by line.

One JSON object a line, in one of four shapes:

- ``{"prompt": str, "completion": str}``: the loss is on the completion tokens only;
- ``{"text": str}``: the loss is on every token (but the first, which nothing predicts);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; the loss is on the assistant turns;
- ``{"prompt": str, "choices": [str, ...], "label": int}``: multiple choice, scored by
  log-likelihood ranking of ``prompt + choice`` (lm-eval's ``acc``).

Extra keys are ignored (datasets carry ids and sources). A bad row is a `DataError` naming
``file:line`` and the fix; blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mwakit.errors import DataError

RowKind = Literal["completion", "text", "messages", "choice"]

_FORMATS = '{"prompt", "completion"}, {"text"}, {"messages"} or {"prompt", "choices", "label"}'
_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Row:
    """One evaluation row (immutable and hashable, so tokenisation can be cached per rows).

    Attributes:
        kind: Which of the four formats the row is.
        where: ``file:line``, for messages about this row.
        prompt: The prompt (``completion`` and ``choice`` rows).
        completion: The scored completion (``completion`` rows).
        text: The text (``text`` rows).
        messages: ``(role, content)`` pairs (``messages`` rows).
        choices: The candidate continuations (``choice`` rows).
        label: Index of the right choice (``choice`` rows).
    """

    kind: RowKind
    where: str
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None


def load_rows(path: str | Path) -> list[Row]:
    """Read and check an evaluation JSONL file.

    Args:
        path: The JSONL file.

    Returns:
        The rows in file order.

    Raises:
        DataError: The file is missing, unreadable or empty, or a row is not one of the four
            formats; the message names ``file:line`` and the fix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("data file not found", where=str(path), fix="pass a JSONL file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot read the data file: {err}", where=str(path), fix="pass a UTF-8 JSONL file"
        ) from err
    rows = [
        parse_row(line, f"{path}:{n}")
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not rows:
        raise DataError("the data file has no rows", where=str(path), fix=f"one {_FORMATS} a line")
    return rows


def parse_row(line: str, where: str) -> Row:
    """Parse one JSONL line into a `Row`.

    Raises:
        DataError: The line is not JSON, or not one of the four formats.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"not JSON ({err.msg})", where=where, fix="one JSON object a line") from err
    if not isinstance(obj, dict):
        raise DataError(
            f"a row must be a JSON object, got {type(obj).__name__}", where=where, fix=_fix()
        )
    if "messages" in obj:
        return Row("messages", where, messages=_messages(obj["messages"], where))
    if "choices" in obj:
        return _choice(obj, where)
    if "text" in obj and "prompt" not in obj:
        return Row("text", where, text=_string(obj, "text", where, empty=False))
    if "prompt" in obj and "completion" in obj:
        return Row(
            "completion",
            where,
            prompt=_string(obj, "prompt", where),
            completion=_string(obj, "completion", where, empty=False),
        )
    if "prompt" in obj:
        raise DataError(
            'a "prompt" row needs a "completion" (or "choices" and "label")',
            where=where,
            fix=_fix(),
        )
    got = ", ".join(sorted(obj)) or "no keys"
    raise DataError(f"not an evaluation row (got {got})", where=where, fix=_fix())


def _fix() -> str:
    return f"give one of {_FORMATS}"


def _string(obj: dict[str, Any], key: str, where: str, *, empty: bool = True) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(
            f'"{key}" must be a string, got {type(v).__name__}', where=where, fix=_fix()
        )
    if not empty and not v.strip():
        raise DataError(
            f'"{key}" is empty: there is nothing to score', where=where, fix="drop the row"
        )
    return v


def _messages(v: object, where: str) -> tuple[tuple[str, str], ...]:
    fix = 'give "messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]'
    if not isinstance(v, list) or not v:
        raise DataError('"messages" must be a non-empty list', where=where, fix=fix)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(
                f'messages[{i}] needs a string "role" and "content"', where=where, fix=fix
            )
        role = m.get("role")
        if role not in _ROLES:
            raise DataError(
                f"messages[{i}]: unknown role {role!r}",
                where=where,
                fix=f"use one of {', '.join(_ROLES)}",
            )
        out.append((str(role), str(m["content"])))
    if not any(r == "assistant" for r, _ in out):
        raise DataError(
            "no assistant turn: there is nothing to score", where=where, fix="add the answer"
        )
    return tuple(out)


def _choice(obj: dict[str, Any], where: str) -> Row:
    fix = 'give "prompt": str, "choices": [str, str, ...], "label": index of the right choice'
    if "prompt" not in obj or "label" not in obj:
        raise DataError('a "choices" row needs "prompt" and "label"', where=where, fix=fix)
    prompt = _string(obj, "prompt", where)
    choices = obj["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise DataError('"choices" must be a list of ≥ 2 non-empty strings', where=where, fix=fix)
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(
            f'"label" must be an index into the {len(choices)} choices, got {label!r}',
            where=where,
            fix=fix,
        )
    return Row("choice", where, prompt=prompt, choices=tuple(choices), label=label)
