"""Keep Hub tokens out of every message, log line and ``--debug`` traceback mwakit prints.

huggingface_hub's and httpx's exceptions may quote a request, a header or a URL; mwakit's own
messages never hold a token, but what they chain might. `redact_exception` rewrites an exception
and everything chained to it in place (args, notes), so even a traceback shows ``***``.
"""

from __future__ import annotations

import contextlib
import os
import sys

_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
_MIN_LEN = 8  # shorter values would blank out ordinary words


def tokens() -> set[str]:
    """The secrets to hide: the token variables, and huggingface_hub's token once it is loaded."""
    found = {os.environ.get(v) or "" for v in _ENV}
    if "huggingface_hub" in sys.modules:  # never import it just for this (slow start-up)
        try:
            from huggingface_hub import get_token

            found.add(get_token() or "")
        except Exception:  # a broken token file must not turn a message into a crash
            pass
    return {t for t in found if len(t) >= _MIN_LEN}


def redact(text: str, secrets: set[str] | None = None) -> str:
    """``text`` with every token replaced by ``***``."""
    for secret in tokens() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


def _clean(value: object, secrets: set[str]) -> object:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, bytes):
        for s in secrets:
            value = value.replace(s.encode(), b"***")
        return value
    return value


def redact_exception(err: BaseException) -> BaseException:
    """Remove tokens from ``err`` and the exceptions chained to it, in place; returns ``err``."""
    secrets = tokens()
    if not secrets:
        return err
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        with contextlib.suppress(TypeError, AttributeError):
            e.args = tuple(_clean(a, secrets) for a in e.args)
        notes = getattr(e, "__notes__", None)
        if isinstance(notes, list):
            e.__notes__ = [str(_clean(n, secrets)) for n in notes]
        for attr in ("what", "where", "fix", "msg", "message", "strerror", "filename"):
            v = getattr(e, attr, None)
            if isinstance(v, str) and any(s in v for s in secrets):
                # A read-only property gets its text from args, cleaned above.
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(e, attr, redact(v, secrets))
        stack += [e.__cause__, e.__context__]
    return err
