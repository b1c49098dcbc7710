"""The one module that talks to the Hugging Face Hub: download, list, push.

``huggingface_hub`` is imported inside the functions, so `mwakit --help` and `validate` stay
fast and the package works without it until a ``hf://`` source or a push is used.

Settings, all read by huggingface_hub itself except the first:

- ``MWAKIT_HUB_CACHE``: the Hub cache folder mwakit downloads into (read at call time). Unset,
  huggingface_hub's own default applies (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``; those two are read when huggingface_hub is imported).
- ``HF_TOKEN`` (or ``hf auth login``): the token. mwakit never reads, prints or writes it.
- ``HF_HUB_OFFLINE=1``: no network; downloads come from the cache only
  (``local_files_only=True``) and listings from the cached snapshot.
- ``HF_ENDPOINT``: another Hub (read at import by huggingface_hub).

A Hub reference is ``hf://org/repo[@revision][/subfolder]``. The revision is a branch, a tag or a
commit sha and may not contain ``/`` (use the commit sha for refs such as ``refs/pr/1``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import HubError
from mwakit.io.layout import MODEL_SIDE_FILES
from mwakit.redact import redact, redact_exception

if TYPE_CHECKING:
    from mwakit.recipe import HubTarget

PREFIX = "hf://"
CACHE_ENV = "MWAKIT_HUB_CACHE"
_SHA = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LOGIN = "run `hf auth login` or set HF_TOKEN"
_SHARD = "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"

#: The files a checkpoint folder may need: adapter or full-model weights, configs, metrics,
#: tokenizer files (copied beside a merged full model) and the default Fisher file. Exact names
#: only (fnmatch's ``*`` and ``?`` also match ``/``, so wildcards would reach nested folders);
#: optimizer and RNG states of Trainer checkpoints are never downloaded.
CHECKPOINT_FILES: tuple[str, ...] = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "trainer_state.json",
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    _SHARD,
    *MODEL_SIDE_FILES[1:],  # config.json is listed above
    "fisher.safetensors",
)


@dataclass(frozen=True)
class HfRef:
    """A parsed ``hf://org/repo[@revision][/subfolder]`` reference.

    Attributes:
        repo_id: ``org/repo``.
        revision: Branch, tag or commit sha; None means the default branch.
        subfolder: Folder inside the repo (``checkpoint-500``, ``runs/a``); None for the root.
    """

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    @property
    def where(self) -> str:
        """``org/repo@rev/subfolder`` for messages."""
        at = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{self.repo_id}{at}{sub}"

    def __str__(self) -> str:
        return PREFIX + self.where

    def pinned(self, sha: str) -> HfRef:
        """The same reference at commit ``sha``."""
        return HfRef(self.repo_id, sha, self.subfolder)

    def child(self, name: str) -> HfRef:
        """The reference of ``name`` inside this one's subfolder."""
        sub = f"{self.subfolder}/{name}" if self.subfolder else name
        return HfRef(self.repo_id, self.revision, sub)


def is_hf_ref(text: str) -> bool:
    """True when ``text`` is a Hub reference (starts with ``hf://``)."""
    return text.startswith(PREFIX)


def parse_hf_ref(text: str) -> HfRef:
    """Parse ``hf://org/repo[@revision][/subfolder]``.

    The revision may not contain ``/``; everything after the repo (and its revision) is the
    subfolder.

    Raises:
        ValueError: Not a valid reference; the message says what is expected.
    """
    expected = "expected hf://org/repo[@revision][/subfolder]"
    if not is_hf_ref(text):
        raise ValueError(f"{text!r} is not a Hub reference: {expected}")
    parts = text[len(PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{text!r} names no repo: {expected}")
    org, name = parts[0], parts[1]
    revision: str | None = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if not revision:
            raise ValueError(f"{text!r} has an empty revision after '@': {expected}")
    if "@" in org or not _NAME.match(org) or not _NAME.match(name):
        raise ValueError(f"{text!r}: invalid repo id {org}/{name}: {expected}")
    sub = [p for p in parts[2:] if p]
    if any(p in (".", "..") for p in sub):
        raise ValueError(f"{text!r}: the subfolder may not contain '.' or '..'")
    return HfRef(f"{org}/{name}", revision, "/".join(sub) or None)


def pin(ref: str, sha: str) -> str:
    """The reference ``ref`` pinned to commit ``sha`` (``hf://org/repo@sha/subfolder``)."""
    return str(parse_hf_ref(ref).pinned(sha))


# -- errors ---------------------------------------------------------------------------------


def _token_present() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _scrub(text: str) -> str:
    """Remove any token from a message (defence in depth: hub messages should hold none)."""
    return redact(text)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _map_error(
    err: BaseException,
    where: str,
    repo_id: str,
    *,
    revision: str | None = None,
    write: bool = False,
) -> HubError:
    """One-line `HubError` (what, where, fix) for an exception raised by huggingface_hub."""
    import httpx2
    from huggingface_hub import errors as e

    page = f"https://huggingface.co/{repo_id}"
    what: str
    fix: str
    if isinstance(err, e.GatedRepoError):
        what = "gated repo: you have not been granted access"
        fix = f"accept the licence on {page} while logged in, then {_LOGIN}"
        if not _token_present():
            what = "gated repo: you are not logged in"
    elif isinstance(err, e.RepositoryNotFoundError):
        if _token_present():
            what = "repository not found, or your token cannot access it"
            fix = "check the repo id (org/name), and that your token may read it"
        else:
            what = "repository not found, or private and you are not logged in"
            fix = f"check the repo id (org/name); for a private repo {_LOGIN}"
    elif isinstance(err, e.RevisionNotFoundError):
        what = "revision not found"
        fix = f"check the revision: a branch, tag or commit sha that exists on {page}"
    elif isinstance(err, e.DisabledRepoError):
        what = "repository disabled"
        fix = f"see {page}"
    elif isinstance(err, e.LocalEntryNotFoundError | e.OfflineModeIsEnabled):
        if _offline():
            what = "not in the local Hub cache, and offline mode is on (HF_HUB_OFFLINE=1)"
            rev = f" --revision {revision}" if revision else ""
            fix = (
                "go online (unset HF_HUB_OFFLINE), or pre-download it with "
                f"`hf download {repo_id}{rev}`, or point {CACHE_ENV} at the cache that has it"
            )
        else:
            what = "cannot reach the Hub and nothing is cached"
            fix = "check your network connection (or HF_ENDPOINT) and retry"
    elif isinstance(err, e.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            what = "not logged in" if not _token_present() else "the Hub rejected your token"
            fix = f"{_LOGIN} with a valid token"
        elif status == 403:
            what = "forbidden" + (": your token may not write here" if write else "")
            fix = (
                "use a token with write access to the namespace (`hf auth login`)"
                if write
                else f"check your access on {page}"
            )
        else:
            what = f"Hub request failed: {_first_line(err)}"
            fix = "retry later; https://status.huggingface.co shows outages"
    elif isinstance(err, httpx2.TransportError):
        what = f"cannot reach the Hub ({type(err).__name__})"
        fix = "check your network connection (or HF_ENDPOINT) and retry"
    elif isinstance(err, e.HFValidationError):
        what = f"invalid repo id or revision: {_first_line(err)}"
        fix = "write the repo id as org/name"
    else:
        what = f"{type(err).__name__}: {_first_line(err)}"
        fix = "retry; re-run with --debug for the traceback"
    return HubError(_scrub(what), where=where, fix=_scrub(fix))


def _hub_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub import errors as e

    return (
        e.HfHubHTTPError,
        e.LocalEntryNotFoundError,
        e.OfflineModeIsEnabled,
        e.HFValidationError,
        e.LocalTokenNotFoundError,
        httpx2.TransportError,
    )


_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_PROBE_TIMEOUT = 3.0
_reached: set[tuple[str, int]] = set()


def _probe_endpoint(where: str) -> None:
    """Fail in a second, with one line, when the Hub's host cannot be reached at all.

    Without this an unreachable network costs huggingface_hub's five retries with backoff
    (about 25 s) before the error. The probe is one DNS lookup and one TCP connect to the
    endpoint, once per process; it is skipped behind a proxy or with a custom HTTP client
    factory (`huggingface_hub.set_client_factory`), where a direct connection says nothing.

    Raises:
        HubError: The host does not resolve, or refuses or drops the connection.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if any(os.environ.get(v) for v in _PROXY_ENV) or factory is not getattr(
        _http, "default_client_factory", factory
    ):
        return
    url = urlsplit(constants.ENDPOINT)
    host = url.hostname
    if not host:
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    if (host, port) in _reached:
        return
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT):
            pass
    except socket.gaierror as err:
        raise HubError(
            f"cannot reach the Hub: {host} does not resolve ({err.strerror or err})",
            where=where,
            fix="check your network connection (or HF_ENDPOINT); offline, set HF_HUB_OFFLINE=1 "
            "to use what the local Hub cache holds",
        ) from None
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise HubError(
            f"cannot reach the Hub: connecting to {host}:{port} failed ({why})",
            where=where,
            fix="check your network connection (or HF_ENDPOINT); offline, set HF_HUB_OFFLINE=1 "
            "to use what the local Hub cache holds",
        ) from None
    _reached.add((host, port))


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """Keep huggingface_hub's "Retrying in 1s [Retry 1/5]" lines off the terminal: the
    outcome is reported as one line (`_map_error`)."""
    log = logging.getLogger("huggingface_hub")
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _require_hub() -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as err:
        raise HubError(
            "huggingface_hub is not installed",
            where="hf:// sources and push",
            fix="pip install 'mwakit[hub]'",
        ) from err


# -- download -------------------------------------------------------------------------------


def cache_dir() -> Path | None:
    """The cache folder from ``MWAKIT_HUB_CACHE``, or None for huggingface_hub's default."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else None


def _patterns(subfolders: Iterable[str | None], files: Sequence[str]) -> list[str]:
    out = []
    for sub in subfolders:
        prefix = f"{sub}/" if sub else ""
        out += [prefix + f for f in files]
    return out


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], where: str) -> Path:
    """``snapshot_download`` limited to ``patterns``; returns the snapshot root."""
    _require_hub()
    from huggingface_hub import snapshot_download

    offline = _offline()
    if not offline:
        _probe_endpoint(where)
    try:
        with _quiet_retries():
            root = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir(),
                allow_patterns=patterns,
                local_files_only=offline,
            )
    except _hub_errors() as err:
        raise _map_error(err, where, repo_id, revision=revision) from redact_exception(err)
    return Path(str(root))


def _sha_of(root: Path, where: str) -> str:
    # The cache layout is models--org--name/snapshots/<sha>/: the folder name is the commit.
    if root.parent.name != "snapshots" or not _SHA.match(root.name):
        raise HubError(
            f"unexpected download folder {root} (not a cache snapshot)",
            where=where,
            fix=f"point {CACHE_ENV} (or HF_HUB_CACHE) at a Hub cache folder",
        )
    return root.name


def fetch(
    repo_id: str,
    revision: str | None,
    subfolders: Sequence[str | None],
    files: Sequence[str] = CHECKPOINT_FILES,
) -> tuple[Path, str]:
    """Download ``files`` of each subfolder of a repo (None: the root) in one snapshot.

    Args:
        repo_id: ``org/repo``.
        revision: Branch, tag or commit sha; None for the default branch.
        subfolders: Folders inside the repo; None stands for the repo root.
        files: File names (or digit-class patterns) wanted in each folder.

    Returns:
        The snapshot root folder and the commit sha it holds.

    Raises:
        HubError: Repo or revision not found, gated, no token, offline with nothing cached, …
    """
    where = f"{repo_id}@{revision}" if revision else repo_id
    root = _snapshot(repo_id, revision, _patterns(subfolders, files), where)
    return root, _sha_of(root, where)


def download(ref: HfRef, files: Sequence[str] = CHECKPOINT_FILES) -> tuple[Path, str]:
    """Download what a checkpoint folder needs and return it with the resolved commit.

    Only ``files`` of ``ref.subfolder`` (or of the repo root) are fetched, never nested folders,
    optimizer states or other checkpoints.

    Returns:
        The local folder of ``ref`` (inside the snapshot) and the commit sha.

    Raises:
        HubError: The download failed, or the folder is not in the repo (or not cached).
    """
    root, sha = fetch(ref.repo_id, ref.revision, [ref.subfolder], files)
    folder = root / ref.subfolder if ref.subfolder else root
    if not folder.is_dir() or not any(folder.iterdir()):
        raise missing_folder(ref, sha)
    return folder, sha


def missing_folder(ref: HfRef, sha: str) -> HubError:
    """The error for a folder with none of the checkpoint files at commit ``sha``."""
    offline = _offline()
    return HubError(
        "no checkpoint files in this folder of the repo"
        + (" (offline: only the local cache was searched)" if offline else ""),
        where=str(ref.pinned(sha))[len(PREFIX) :],
        fix=(
            f"go online (unset HF_HUB_OFFLINE) or pre-download it: `hf download {ref.repo_id}"
            f" --revision {sha}`"
            if offline
            else "check the subfolder (e.g. checkpoint-500) in the repo's file list"
        ),
    )


def _cached_sha(repo_id: str, revision: str | None) -> tuple[Path, str] | None:
    """The cached snapshot folder and sha of repo@revision, or None when not cached."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    base = cache_dir() or Path(constants.HF_HUB_CACHE)
    storage = base / repo_folder_name(repo_id=repo_id, repo_type="model")
    rev = revision or constants.DEFAULT_REVISION
    sha = rev if _SHA.match(rev) else None
    ref_file = storage / "refs" / rev
    if sha is None and ref_file.is_file():
        sha = ref_file.read_text(encoding="utf-8").strip()
    if sha is None or not (storage / "snapshots" / sha).is_dir():
        return None
    return storage / "snapshots" / sha, sha


def list_checkpoints(
    repo_id: str, revision: str | None = None, subfolder: str | None = None
) -> list[str]:
    """The ``checkpoint-<step>`` folders of a repo (or of one of its folders), sorted by step.

    Online this lists the repo tree at ``revision``; offline (``HF_HUB_OFFLINE=1``) it lists the
    cached snapshot, so only folders downloaded before are seen.

    Returns:
        Folder paths relative to the repo root (``checkpoint-500``, ``runs/a/checkpoint-500``).

    Raises:
        HubError: The repo or revision is not found, gated, needs a token, or is not cached.
    """
    _require_hub()
    where = f"{repo_id}@{revision}" if revision else repo_id
    names: list[str]
    if _offline():
        cached = _cached_sha(repo_id, revision)
        if cached is None:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise _map_error(
                LocalEntryNotFoundError("nothing cached"), where, repo_id, revision=revision
            )
        root = cached[0] / subfolder if subfolder else cached[0]
        names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    else:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFolder

        _probe_endpoint(where)
        try:
            with _quiet_retries():
                tree = HfApi().list_repo_tree(repo_id, path_in_repo=subfolder, revision=revision)
                names = [t.path.rsplit("/", 1)[-1] for t in tree if isinstance(t, RepoFolder)]
        except _hub_errors() as err:
            raise _map_error(err, where, repo_id, revision=revision) from redact_exception(err)
    steps = sorted((int(m.group(1)), n) for n in names if (m := _CHECKPOINT.match(n)))
    prefix = f"{subfolder}/" if subfolder else ""
    return [prefix + n for _, n in steps]


# -- push -----------------------------------------------------------------------------------


def _retry(folder: Path, target: HubTarget) -> str:
    opts = [f"--repo-id {target.repo_id}", "--private" if target.private else "--public"]
    if target.revision:
        opts.append(f"--revision {target.revision}")
    if target.create_pr:
        opts.append("--create-pr")
    return f"then retry with `mwakit push {folder} {' '.join(opts)}`"


def preflight(target: HubTarget) -> None:
    """Fail early, before a long merge, when a push cannot work: no huggingface_hub, no token.

    Raises:
        HubError: What is missing and how to fix it.
    """
    _require_hub()
    if not _token_present():
        where = target.repo_id + (f"@{target.revision}" if target.revision else "")
        raise HubError(
            "no Hub token: pushing needs one (nothing was merged yet)",
            where=where,
            fix=f"{_LOGIN}, or run without --push (--no-push)",
        )


def push(folder: str | Path, target: HubTarget) -> str:
    """Upload a finished output folder to the Hub in one commit.

    Creates the repo if needed (``exist_ok``; ``private`` applies only to a new repo), creates
    the branch ``target.revision`` if given, then uploads the whole folder with one
    ``upload_folder`` commit (or pull request with ``create_pr``).

    Args:
        folder: The output folder (already complete).
        target: Where and how to upload (``output.hub`` of the recipe).

    Returns:
        The URL of the commit, or of the pull request when ``create_pr`` is set.

    Raises:
        HubError: No token, no access, network failure, …; the message says how to retry.
    """
    from mwakit import __version__

    folder = Path(folder)
    retry = _retry(folder, target)
    where = target.repo_id + (f"@{target.revision}" if target.revision else "")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(
            f"nothing to upload: {folder} is not a folder with files",
            where=where,
            fix="run the merge first (`mwakit run recipe.yaml`), then push its output folder",
        )
    if target.create_pr and target.revision:
        raise HubError(
            "create_pr and revision cannot be combined",
            where=where,
            fix="drop revision (the pull request targets the default branch) or create_pr",
        )
    _require_hub()
    if not _token_present():
        raise HubError("no Hub token: pushing needs one", where=where, fix=f"{_LOGIN}; {retry}")
    from huggingface_hub import HfApi

    api = HfApi()
    message = target.commit_message or f"Upload {folder.name} (merged with mwakit {__version__})"
    try:
        url = api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or target.repo_id
        if target.revision:
            api.create_branch(repo_id, branch=target.revision, exist_ok=True)
        info: Any = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            revision=target.revision,
            create_pr=target.create_pr,
        )
    except _hub_errors() as err:
        mapped = _map_error(err, where, target.repo_id, write=True)
        raise HubError(
            f"upload failed: {mapped.what}",
            where=where,
            fix=f"{mapped.fix}; the local folder {folder} is complete, {retry}",
        ) from redact_exception(err)
    if target.create_pr and getattr(info, "pr_url", None):
        return str(info.pr_url)
    return str(info.commit_url)
