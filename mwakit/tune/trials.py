"""The trial log: one JSON line per scored candidate, so an interrupted tune resumes.

The first line is a header holding the tune's context (the checkpoints, the data files'
sha256, the base model, the metric); a log written for another context is refused rather than
mixed in. Every later line is one trial: the candidate's memo key, the split, the score (mean
and per-row values) and how long it took. Lines are appended and flushed one by one; a last
line cut by a crash is skipped on reading.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mwakit.errors import UsageError

FORMAT = 1


@dataclass(frozen=True)
class Score:
    """A candidate's score on one split.

    Attributes:
        value: The metric over the split (as the evaluator reports it).
        per_row: The metric per row, for paired standard errors.
        seconds: Wall time of the whole trial (merge + evaluation).
        merge_seconds: Of which the in-memory merge and the swap into the loaded model.
    """

    value: float
    per_row: tuple[float, ...] = ()
    seconds: float = 0.0
    merge_seconds: float = 0.0


@dataclass(frozen=True)
class Trial:
    """One line of the log.

    Attributes:
        key: The candidate's memo key (`mwakit.tune.candidates.recipe_key`).
        split: ``val`` or ``test``.
        name: The candidate's label.
        search: The search that proposed it.
        kind: The candidate's kind (a `mwakit.tune.candidates.TIER` key).
        score: The score.
        recipe: The candidate's recipe data.
    """

    key: str
    split: str
    name: str
    search: str
    kind: str
    score: Score
    recipe: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The trial as a JSON object (the log's line, and an entry of ``--json``'s trials)."""
        return {
            "key": self.key,
            "split": self.split,
            "name": self.name,
            "search": self.search,
            "kind": self.kind,
            "value": _finite(self.score.value),
            "per_row": [_finite(x) for x in self.score.per_row],
            "seconds": round(self.score.seconds, 4),
            "merge_seconds": round(self.score.merge_seconds, 4),
            "recipe": self.recipe,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Trial:
        """Read a trial back (`to_json`'s inverse).

        Raises:
            KeyError: A field is missing.
            TypeError: A field has the wrong type.
            ValueError: A value is not a number.
        """
        score = Score(
            _num(d["value"]),
            tuple(_num(x) for x in d["per_row"]),
            float(d.get("seconds", 0.0)),
            float(d.get("merge_seconds", 0.0)),
        )
        return cls(
            str(d["key"]),
            str(d["split"]),
            str(d["name"]),
            str(d["search"]),
            str(d["kind"]),
            score,
            dict(d.get("recipe") or {}),
        )


def _finite(x: float) -> float | str:
    # JSON has no NaN: a diverged candidate's loss is written as a string and read back.
    return x if math.isfinite(x) else str(x)


def _num(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        raise TypeError(f"not a number: {x!r}")
    return float(x)


class TrialLog:
    """Scores by (memo key, split), kept in memory and appended to a JSONL file if given.

    Args:
        path: The log file (created, or read back to resume); None keeps scores in memory.
        context: What the scores depend on besides the candidate: a log written for another
            context is refused.

    Raises:
        UsageError: The file holds another tune's trials, or is not a trial log.
    """

    def __init__(self, path: str | Path | None, context: Mapping[str, Any]) -> None:
        self.path = None if path is None else Path(path)
        self.context = json.loads(json.dumps(dict(context), sort_keys=True, default=str))
        self.trials: dict[tuple[str, str], Trial] = {}
        self.resumed = 0
        if self.path is not None and self.path.is_file() and self.path.stat().st_size:
            self._read(self.path)
            self.resumed = len(self.trials)
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = {"mwakit_tune": FORMAT, "context": self.context}
            self._append(header)

    def _read(self, path: Path) -> None:
        where = str(path)
        fix = "delete the file, or give another --trial-log"
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except (ValueError, IndexError) as err:
            raise UsageError("not a tune trial log", where=where, fix=fix) from err
        if not isinstance(header, dict) or header.get("mwakit_tune") != FORMAT:
            raise UsageError("not a tune trial log (no header line)", where=where, fix=fix)
        if header.get("context") != self.context:
            theirs = header.get("context") or {}
            diff = sorted(
                k
                for k in {*self.context, *theirs}
                if self.context.get(k) != (theirs.get(k) if isinstance(theirs, dict) else None)
            )
            raise UsageError(
                f"the trial log was written by another tune (different {', '.join(diff)})",
                where=where,
                fix=fix,
            )
        cut = False
        for n, line in enumerate(lines[1:], start=2):
            try:
                t = Trial.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as err:
                if n == len(lines):  # the last line, cut short by an interrupted tune
                    cut = True
                    break
                raise UsageError(
                    f"line {n} is not a trial ({type(err).__name__}: {err})"[:200],
                    where=where,
                    fix=fix,
                ) from err
            self.trials[(t.key, t.split)] = t
        text = path.read_text(encoding="utf-8")
        if cut or not text.endswith("\n"):
            # The next append must start a line of its own: drop a cut line, end a whole one.
            keep = text[: text.rfind("\n") + 1] if cut else text + "\n"
            path.write_text(keep, encoding="utf-8")

    def _append(self, doc: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(doc, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str, split: str) -> Trial | None:
        """The trial of this key and split, if scored (in this run or the log)."""
        return self.trials.get((key, split))

    def add(self, trial: Trial) -> None:
        """Record a trial (and append it to the file)."""
        self.trials[(trial.key, trial.split)] = trial
        self._append(trial.to_json())

    def __iter__(self) -> Iterator[Trial]:
        return iter(self.trials.values())

    def __len__(self) -> int:
        return len(self.trials)
