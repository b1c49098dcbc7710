"""Tokenise evaluation rows once into scored sequences, and pack them into padded batches.

A row becomes one sequence (a choice row: one per choice) with the token positions whose
prediction is scored. Position ``j`` is predicted from the logits at ``j - 1``, so position 0
is never scored. Prompt and completion are tokenised separately and joined (the prompt with
the tokenizer's special tokens, e.g. BOS; the completion without), as TRL does: the data says
where the prompt ends, not a tokenizer's merge across the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mwakit.errors import DataError
from mwakit.evaluate.data import Row


@dataclass(frozen=True)
class Seq:
    """One tokenised sequence.

    Attributes:
        row: Index of its row.
        choice: Index of the choice (multiple choice), else -1.
        ids: Token ids.
        targets: Scored positions (ascending, each ≥ 1).
        answer: ``(start, end)`` of the answer an exact match compares (the completion, the
            last assistant turn up to and including its EOS), or None.
        eos_terminated: The answer's last token is an EOS token (the exact-match shortcut holds).
    """

    row: int
    choice: int
    ids: tuple[int, ...]
    targets: tuple[int, ...]
    answer: tuple[int, int] | None = None
    eos_terminated: bool = False


def encode_rows(
    rows: Sequence[Row], tokenizer: Any, *, eos_ids: frozenset[int], max_len: int | None
) -> list[Seq]:
    """Tokenise every row.

    Args:
        rows: The rows (from `load_rows`).
        tokenizer: A transformers tokenizer.
        eos_ids: Token ids that end a generation (tokenizer and generation config).
        max_len: The longest sequence the model takes (``max_position_embeddings``), or None.

    Returns:
        The sequences, in row order (a choice row's choices in order).

    Raises:
        DataError: A row has nothing to score, is longer than the model takes, or needs a chat
            template the tokenizer lacks; naming ``file:line``.
    """
    out: list[Seq] = []
    for i, row in enumerate(rows):
        if row.kind == "text":
            assert row.text is not None
            ids = _ids(tokenizer, row.text, special=True)
            seqs = [Seq(i, -1, tuple(ids), tuple(range(1, len(ids))))]
        elif row.kind == "completion":
            assert row.prompt is not None and row.completion is not None
            seqs = [_joined(i, -1, tokenizer, row.prompt, row.completion, eos_ids)]
        elif row.kind == "choice":
            assert row.prompt is not None and row.choices is not None
            seqs = [
                _joined(i, c, tokenizer, row.prompt, choice, eos_ids)
                for c, choice in enumerate(row.choices)
            ]
        else:
            seqs = [_chat(i, row, tokenizer, eos_ids)]
        for s in seqs:
            if not s.targets:
                raise DataError(
                    "the row has no token to score (a one-token text without BOS?)",
                    where=row.where,
                    fix="give a longer text, or drop the row",
                )
            if max_len is not None and len(s.ids) > max_len:
                raise DataError(
                    f"the row is {len(s.ids)} tokens; the model takes at most {max_len}",
                    where=row.where,
                    fix="shorten the row, or split it into several",
                )
        out.extend(seqs)
    return out


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _joined(
    row: int, choice: int, tokenizer: Any, prompt: str, completion: str, eos_ids: frozenset[int]
) -> Seq:
    p = _ids(tokenizer, prompt, special=True)
    c = _ids(tokenizer, completion, special=False)
    ids = p + c
    start = max(len(p), 1)  # with no BOS and an empty prompt, nothing predicts the first token
    answer = (len(p), len(ids))
    return Seq(
        row, choice, tuple(ids), tuple(range(start, len(ids))), answer, bool(c) and c[-1] in eos_ids
    )


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], gen: bool, where: str) -> str:
    msgs = [{"role": r, "content": c} for r, c in messages]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    except Exception as err:  # jinja raises its own errors for a template's own checks
        raise DataError(
            f"the chat template failed: {err}",
            where=where,
            fix="check the roles the template accepts, or give prompt/completion rows",
        ) from err
    return str(text)


def _chat(i: int, row: Row, tokenizer: Any, eos_ids: frozenset[int]) -> Seq:
    """A messages row: the chat template's text, scoring the assistant turns' tokens."""
    assert row.messages is not None
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template for a messages row",
            where=row.where,
            fix="use a tokenizer with a chat template (--tokenizer), or prompt/completion rows",
        )
    full = _render(tokenizer, row.messages, False, row.where)
    spans = []  # character spans of the assistant turns in `full`
    for k, (role, _) in enumerate(row.messages):
        if role != "assistant":
            continue
        pre = _render(tokenizer, row.messages[:k], True, row.where)
        upto = _render(tokenizer, row.messages[: k + 1], False, row.where)
        if not (full.startswith(upto) and upto.startswith(pre)):
            # Some templates rewrite earlier turns (drop past reasoning, add dates): the turns'
            # tokens cannot be located, so they are not guessed.
            raise DataError(
                "the chat template does not render a conversation's turns as prefixes of it",
                where=row.where,
                fix="give prompt/completion rows rendered as you want them scored",
            )
        spans.append((len(pre), len(upto)))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    else:
        # No offsets from a slow tokenizer: each token of a turn gets the turn's start, from
        # the token counts of the rendered prefixes (a turn boundary is a token boundary).
        ids = _ids(tokenizer, full, special=False)
        offsets = [(len(full), len(full))] * len(ids)
        for a, b in spans:
            n0 = len(_ids(tokenizer, full[:a], special=False))
            n1 = len(_ids(tokenizer, full[:b], special=False))
            offsets[n0:n1] = [(a, b)] * (n1 - n0)
    targets: list[int] = []
    answer: tuple[int, int] | None = None
    eos_end = False
    for a, b in spans:
        turn = [j for j, (s, _) in enumerate(offsets) if a <= s < b and j > 0]
        # A turn ends at its EOS: what the template adds after it (a newline) is formatting,
        # not something the model generates.
        cut = next((n + 1 for n, j in enumerate(turn) if ids[j] in eos_ids), len(turn))
        turn = turn[:cut]
        targets += turn
        if turn:
            answer = (turn[0], turn[-1] + 1)
            eos_end = ids[turn[-1]] in eos_ids
    return Seq(i, -1, tuple(ids), tuple(targets), answer, eos_end)


def batches(seqs: Sequence[Seq], batch_tokens: int) -> list[list[int]]:
    """Group sequences of similar length so padding stays small.

    Sequences are sorted by length (longest first) and cut into batches whose padded size
    (count × longest) stays within ``batch_tokens``; a sequence longer than that is a batch
    of its own.

    Returns:
        Lists of indices into ``seqs``.
    """
    order = sorted(range(len(seqs)), key=lambda k: (-len(seqs[k].ids), k))
    out: list[list[int]] = []
    cur: list[int] = []
    for k in order:
        width = len(seqs[cur[0]].ids) if cur else len(seqs[k].ids)
        if cur and (len(cur) + 1) * width > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(k)
    if cur:
        out.append(cur)
    return out
