"""The one error tree of mwakit.

Library code raises these and never prints or exits; the CLI turns each into one line and an
exit code. Every error carries structured fields (where, why, how to fix) so callers can act on
them without parsing the message.
"""

from __future__ import annotations

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
    """One problem found while validating a recipe."""

    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


class RecipeError(MwakitError):
    """The recipe is invalid; `problems` lists every problem found, each with its location."""

    def __init__(self, problems: list[Problem], *, source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        n = len(problems)
        what = f"{n} problem{'s' if n != 1 else ''} in recipe: " + "; ".join(map(str, problems))
        super().__init__(what, where=source, fix="correct the recipe and run `mwakit validate`")


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


class UsageError(MwakitError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2
