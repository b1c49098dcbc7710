"""The one error tree of mwakit.

Library code raises these and never prints or exits; the CLI turns each into one line and an
exit code. Every error carries structured fields (where, why, how to fix) so callers can act on
them without parsing the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class MwakitError(Exception):
    """Root of every error mwakit raises on purpose.

    Args:
        what: What went wrong, in a few words.
        where: The place: a file, a recipe location, a checkpoint and key.
        fix: How the user can fix it.
    """

    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one-line message the CLI prints."""
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " — ".join(parts)


@dataclass(frozen=True)
class Problem:
    """One problem found while validating a recipe (or planning it).

    Attributes:
        loc: Where: a recipe location (``params.penalty``, ``line 3``), a checkpoint, a key.
        msg: What is wrong.
        fix: How to fix it, when the problem knows better than "correct the recipe".
    """

    loc: str
    msg: str
    fix: str | None = None

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


RECIPE_FIX = "correct the recipe, then check it again with `mwakit validate`"


class RecipeError(MwakitError):
    """The recipe is invalid, or cannot run: `problems` lists every problem found, each with
    its location (and its own fix, when it has one).

    `validate`, `plan` and `run` raise it when they find several problems at once (any mix of
    recipe, source, metric and plan problems); a single problem of another kind is raised as
    its own error (`SourceError`, `PlanError`, ...).
    """

    def __init__(self, problems: list[Problem], *, source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        n = len(problems)
        if n == 1:
            # One problem reads as one line: "r.yaml: params.penalty: ... — fix: ...".
            what, fix = str(problems[0]), problems[0].fix or RECIPE_FIX
        else:
            what = f"{n} problems in recipe: " + "; ".join(map(str, problems))
            fix = RECIPE_FIX
        super().__init__(what, where=source, fix=fix)


class SourceError(MwakitError):
    """A checkpoint could not be found or read (missing folder, no adapter files, bad JSON)."""


class MetricError(MwakitError):
    """A metric is missing, not finite, or out of the range a transform needs."""


class PlanError(MwakitError):
    """Checkpoints do not fit together (keys, shapes, ranks, adapter types) or a rule is bad."""


class TensorError(MwakitError):
    """An input tensor holds NaN/Inf, or a merge produced a non-finite value."""


class OutputError(MwakitError):
    """The output folder exists, or could not be written."""


class HubError(MwakitError):
    """A Hugging Face Hub download or upload failed."""


class ConvertError(MwakitError):
    """A mergekit config could not be converted into a recipe (nothing usable in it)."""


class DataError(MwakitError):
    """An evaluation data file or one of its rows is unusable (`mwakit eval`, `mwakit tune`)."""


class UsageError(MwakitError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_SHOWN = 3  # places named for a problem seen in several places


class Problems:
    """Collects errors so that one pass over a recipe reports every problem, not the first.

    The planner and the sources run their checks inside `collect` and carry on after a
    failed one where later checks still make sense; `validate`, `plan` and `run` share that
    one code path, so they reach the same verdict with the same messages. The same problem in
    many places (one shape mismatch in each of 200 tensors) is reported once, naming the first
    few places.
    """

    def __init__(self) -> None:
        self._errors: list[MwakitError] = []
        self._also: dict[tuple[type[MwakitError], str, str | None], list[str]] = {}

    def __bool__(self) -> bool:
        return bool(self._errors)

    def __len__(self) -> int:
        return len(self._errors)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record a `MwakitError` raised in the block and continue after the block."""
        try:
            yield
        except MwakitError as err:
            self.add(err)

    def add(self, err: MwakitError) -> None:
        """Record one error (a `RecipeError` adds each of its problems)."""
        if isinstance(err, RecipeError) and len(err.problems) > 1:
            for p in err.problems:
                self.add(RecipeError([p], source=err.source))
            return
        # Numbers and places differ between instances of one problem; the wording does not.
        key = (type(err), _NUMBER.sub("#", err.what), err.fix)
        if key in self._also:
            self._also[key].append(err.where or "")
            return
        self._also[key] = []
        self._errors.append(err)

    @property
    def errors(self) -> list[MwakitError]:
        """The errors, in the order found; repeats folded into the first ("also in ...")."""
        out = []
        for err in self._errors:
            also = [w for w in self._also[(type(err), _NUMBER.sub("#", err.what), err.fix)] if w]
            if also:
                more = f" and {len(also) - _SHOWN} more" if len(also) > _SHOWN else ""
                err = _with_suffix(err, f" (also in {', '.join(also[:_SHOWN])}{more})")
            out.append(err)
        return out

    def raise_if_any(self, source: str | None = None) -> None:
        """Raise what was found: the error itself when there is one, else a `RecipeError`.

        Args:
            source: The recipe file, named in front of several problems.

        Raises:
            MwakitError: The single problem found.
            RecipeError: Several problems, each with its location and fix.
        """
        errors = self.errors
        if len(errors) == 1:
            raise errors[0]
        if errors:
            problems = []
            for e in errors:
                if isinstance(e, RecipeError):
                    problems.extend(e.problems)
                else:
                    problems.append(Problem(e.where or "", e.what, e.fix))
            raise RecipeError(problems, source=source)


def _with_suffix(err: MwakitError, suffix: str) -> MwakitError:
    """A copy of ``err`` (same class) with ``suffix`` added to what went wrong."""
    if isinstance(err, RecipeError):
        p = err.problems[0]
        return RecipeError([Problem(p.loc, p.msg + suffix, p.fix)], source=err.source)
    new = Exception.__new__(type(err))
    new.__dict__.update(err.__dict__)  # every field a subclass keeps
    new.what = err.what + suffix
    new.args = (new.message,)
    new.__cause__ = err.__cause__
    return new
