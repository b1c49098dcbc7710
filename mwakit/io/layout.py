"""Names of the files in checkpoint and model folders that mwakit reads or writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

#: Files of a full model that travel with the merged weights (from the base, else the first).
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _hub_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hub cache repo whose snapshot holds ``folder``, if any.

    A Hub cache stores each file once under ``<repo>/blobs/<hash>``; a snapshot
    ``<repo>/snapshots/<sha>/...`` holds symlinks to them (``../../blobs/<hash>``).
    """
    for a in folder.parents:
        if a.name == "snapshots" and (a.parent / "blobs").is_dir():
            return a.parent / "blobs"
    return None


def inside_folder(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused when it could resolve outside ``folder``.

    A name from a file (an index's shard name) or a side file copied into an output must not
    reach files elsewhere: absolute names and ``..`` are refused, and so is a symlink whose
    target lies outside the folder — except a Hub cache snapshot's links into its own
    ``blobs/`` folder, which is how every downloaded file is stored.

    Args:
        folder: The checkpoint or model folder.
        name: The relative file name.
        what: What the file is, for the message (``"shard"``, ``"side file"``).

    Raises:
        SourceError: The name is absolute, climbs out with ``..``, or resolves outside.
    """
    from mwakit.errors import SourceError

    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in rel.parts:
        raise SourceError(
            f"{what} name {name!r} points outside the folder (absolute or '..')",
            where=str(folder),
            fix="file names in a checkpoint folder must be plain relative names; restore the "
            "files save_pretrained wrote",
        )
    path = folder / name
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    if real == root or root in real.parents:
        return path
    blobs = _hub_blobs(root)
    if blobs is not None and real.parent == Path(os.path.realpath(blobs)):
        return path
    raise SourceError(
        f"{what} {name} is a symlink to {real}, outside the checkpoint folder",
        where=str(folder),
        fix="replace the link by a copy of the file you mean, or remove it (mwakit never reads "
        "or copies files from outside an input folder through a link)",
    )


def side_files(folder: Path, names: Sequence[str] = MODEL_SIDE_FILES) -> list[Path]:
    """The side files of a model folder that exist (config, tokenizer, generation config).

    Args:
        folder: The model or checkpoint folder.
        names: Which names to look for, in the order returned.

    Raises:
        SourceError: One of them is a symlink that resolves outside ``folder``.
    """
    found = []
    for name in names:
        if os.path.lexists(folder / name):
            f = inside_folder(folder, name, "side file")
            if f.is_file():
                found.append(f)
    return found
