"""Estimate the diagonal Fisher of a PEFT adapter's trainable tensors (for `method: fisher`).

F(j) = mean over examples of (∂ log p(y|x) / ∂θ_j)², one example at a time (batch size 1),
where log p(y|x) is the sum of the log-probabilities of the example's label tokens. Empirical
Fisher: y are the data's labels; sampled ("true") Fisher: every label token is drawn from the
model's own next-token distribution given the data's prefix (teacher forcing), seeded.

The result is written beside the adapter as a safetensors file whose keys are exactly the
adapter file's keys, so `mwakit.planner` pairs each tensor with its Fisher by name. This module
imports torch, transformers and peft inside its functions: `import mwakit` stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import SourceError

if TYPE_CHECKING:
    import torch

#: Files any of which marks a folder as holding a tokenizer `AutoTokenizer` can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: The label value causal-LM code ignores (prompt tokens, padding).
IGNORE = -100


@dataclass(frozen=True)
class _Example:
    """One tokenised example: ids and labels of equal length (IGNORE = not a label)."""

    input_ids: list[int]
    labels: list[int]


def estimate_fisher(
    base_dir: Path,
    adapter_dir: Path,
    data: Path,
    *,
    max_examples: int = 64,
    empirical: bool = True,
    seed: int = 0,
    out_name: str = "fisher.safetensors",
) -> Path:
    """Estimate the diagonal Fisher of an adapter's trainable tensors and save it beside it.

    The Fisher is the mean over examples of the squared gradient of log p(y|x), one example
    at a time, where log p(y|x) sums the log-probabilities of the example's label tokens. It is
    written in float32 with exactly the keys of the adapter's own file, so `method: fisher`
    finds it as ``fisher_file`` in each checkpoint folder.

    Args:
        base_dir: Local folder of the base model (``AutoModelForCausalLM``), loaded in float32
            on CUDA when available, else the CPU.
        adapter_dir: The PEFT adapter folder (a checkpoint); the Fisher is written here.
        data: JSONL, one example a line: ``{"text": ...}`` (every token is a label),
            ``{"prompt": ..., "completion": ...}`` (only completion tokens are labels) or
            ``{"input_ids": [...]}`` with optional ``"labels"`` (-100 = not a label), which
            needs no tokenizer. Text is tokenised with the tokenizer in ``base_dir``, else the
            one in ``adapter_dir``; sequences are cut to the model's
            ``max_position_embeddings``.
        max_examples: Use the first this many examples that have at least one label token.
        empirical: True: the data's labels (empirical Fisher). False: labels sampled from the
            model's own distribution (the true Fisher, by Monte Carlo).
        seed: Seeds the sampled labels; the same inputs and seed give the same file.
        out_name: File name written inside ``adapter_dir``.

    Returns:
        The path of the written Fisher file.

    Raises:
        SourceError: A folder or file is missing or unreadable, a data line is malformed, text
            needs a tokenizer that neither folder has, no example has a label token, or the
            adapter's keys cannot be matched to trainable tensors.
        ValueError: ``max_examples`` < 1 or ``out_name`` is not a plain file name.
    """
    import torch

    if max_examples < 1:
        raise ValueError(f"max_examples must be ≥ 1, got {max_examples}")
    if not out_name or Path(out_name).name != out_name:
        raise ValueError(f"out_name must be a file name, got {out_name!r}")
    _check_folders(base_dir, adapter_dir, data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _load(base_dir, adapter_dir, device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise SourceError(
            "the adapter has no trainable tensors", where=str(adapter_dir), fix="check the adapter"
        )
    max_len = getattr(model.config, "max_position_embeddings", None)
    examples = _examples(data, base_dir, adapter_dir, max_examples, max_len, model)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for ex in examples:
        ll = _log_likelihood(model, ex, device, None if empirical else gen)
        grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
        for s, g in zip(sums.values(), grads, strict=True):
            if g is not None:  # a tensor this example does not reach has gradient 0
                s.addcmul_(g.float(), g.float())
        count += 1
    if count == 0:
        raise SourceError(
            "no example has a label token",
            where=str(data),
            fix="give non-empty completions or texts of at least two tokens",
        )
    fisher = {n: (s / count).cpu().contiguous() for n, s in sums.items()}
    tensors = _adapter_keys(model, fisher, adapter_dir)
    meta = {
        "format": "pt",
        "mwakit_fisher": "empirical" if empirical else "sampled",
        "examples": str(count),
        "seed": str(seed),
    }
    return _save_atomic(tensors, adapter_dir / out_name, meta)


def _check_folders(base_dir: Path, adapter_dir: Path, data: Path) -> None:
    if not (base_dir / "config.json").is_file():
        raise SourceError(
            "no config.json: not a model folder",
            where=str(base_dir),
            fix="pass the local folder of the base model the adapter was trained on",
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SourceError(
            "no adapter_config.json: not a PEFT adapter folder",
            where=str(adapter_dir),
            fix="pass a checkpoint folder saved by a PEFT model",
        )
    if not data.is_file():
        raise SourceError("data file not found", where=str(data), fix="pass a JSONL file")


def _load(base_dir: Path, adapter_dir: Path, device: torch.device) -> Any:
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Library code stays silent: no loading progress bar, no upstream deprecation chatter.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    except (OSError, ValueError, KeyError) as err:
        raise SourceError(
            f"could not load the base model and adapter: {err}",
            where=str(adapter_dir),
            fix="check that the adapter was trained on this base model",
        ) from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # eval(): no dropout, so the gradients are those of the deterministic model.
    return model.to(device).eval()


def _tokenizer(base_dir: Path, adapter_dir: Path) -> Any | None:
    for folder in (base_dir, adapter_dir):
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError) as err:
                raise SourceError(
                    f"could not load the tokenizer: {err}",
                    where=str(folder),
                    fix="repair the tokenizer files, or give input_ids lines",
                ) from err
    return None


def _examples(
    data: Path,
    base_dir: Path,
    adapter_dir: Path,
    max_examples: int,
    max_len: int | None,
    model: Any,
) -> Iterator[_Example]:
    """Yield up to ``max_examples`` examples with at least one label token, in file order."""
    vocab = model.get_input_embeddings().num_embeddings
    tok: Any = None
    tok_loaded = False
    yielded = 0
    with data.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if yielded >= max_examples:
                return
            if not line.strip():
                continue
            where = f"{data}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(
                    f"not JSON: {err.msg}", where=where, fix="one JSON object a line"
                ) from err
            if not isinstance(row, dict):
                raise SourceError("a line must be a JSON object", where=where)
            if "input_ids" not in row and not tok_loaded:
                tok, tok_loaded = _tokenizer(base_dir, adapter_dir), True
            ex = _parse(row, tok, where, base_dir)
            if max_len is not None:
                ex = _Example(ex.input_ids[:max_len], ex.labels[:max_len])
            if any(not 0 <= i < vocab for i in ex.input_ids):
                raise SourceError(f"a token id is outside [0, {vocab})", where=where)
            # Label j is predicted from position j − 1: the first position is never a label.
            if all(y == IGNORE for y in ex.labels[1:]):
                continue
            yielded += 1
            yield ex


def _parse(row: dict[str, Any], tok: Any, where: str, base_dir: Path) -> _Example:
    if "input_ids" in row:
        ids = row["input_ids"]
        labels = row.get("labels", ids)
        if not _int_list(ids) or not _int_list(labels) or len(labels) != len(ids):
            raise SourceError(
                "input_ids (and labels) must be equal-length lists of integers", where=where
            )
        return _Example(list(ids), list(labels))
    if "text" in row or ("prompt" in row and "completion" in row):
        if tok is None:
            raise SourceError(
                "text needs a tokenizer, and neither the base nor the adapter folder has one",
                where=where,
                fix=f"save the tokenizer into {base_dir}, or give {{'input_ids': [...]}} lines",
            )
        if "text" in row:
            ids = _encode(tok, row["text"], where, special=True)
            return _Example(ids, list(ids))
        p = _encode(tok, row["prompt"], where, special=True)
        c = _encode(tok, row["completion"], where, special=False)
        # Only the completion is predicted: the prompt is conditioning, not a label.
        return _Example(p + c, [IGNORE] * len(p) + c)
    raise SourceError(
        f"no usable fields (got {', '.join(sorted(row)) or 'none'})",
        where=where,
        fix='give "text", "prompt" + "completion", or "input_ids"',
    )


def _int_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _encode(tok: Any, text: object, where: str, *, special: bool) -> list[int]:
    if not isinstance(text, str):
        raise SourceError("text, prompt and completion must be strings", where=where)
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _log_likelihood(
    model: Any, ex: _Example, device: torch.device, gen: torch.Generator | None
) -> torch.Tensor:
    """log p(y|x): the summed log-probabilities of the label tokens (sampled if ``gen``)."""
    import torch

    ids = torch.tensor([ex.input_ids], device=device)
    labels = torch.tensor(ex.labels[1:], device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    keep = labels != IGNORE
    logp = torch.log_softmax(logits[keep], dim=-1)
    if gen is None:
        y = labels[keep]
    else:
        # Samples carry no gradient: the Fisher is E_y~p[(∇ log p(y))²] at the model's p.
        with torch.no_grad():
            y = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
    return logp.gather(1, y.unsqueeze(1)).sum()


def _adapter_keys(
    model: Any, fisher: dict[str, torch.Tensor], adapter_dir: Path
) -> dict[str, torch.Tensor]:
    """Rename parameter names to the adapter file's keys (PEFT's own save mapping), checked."""
    from peft import get_peft_model_state_dict

    # The mapping save_pretrained uses: drops the adapter name (".default"), unwraps
    # modules_to_save, and keeps only what the adapter file holds.
    mapped = get_peft_model_state_dict(model, state_dict=fisher, save_embedding_layers=False)
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return dict(mapped)
    from mwakit.io.header import read_header

    keys = list(read_header(file).tensors)  # the header is enough: no mapping, no bytes
    missing = [k for k in keys if k not in mapped]
    if missing:
        raise SourceError(
            f"{len(missing)} adapter tensor(s) have no trainable parameter, e.g. {missing[0]}",
            where=str(file),
            fix="load the adapter with the base model it was trained on",
        )
    return {k: mapped[k] for k in keys}


def _save_atomic(tensors: dict[str, torch.Tensor], target: Path, meta: dict[str, str]) -> Path:
    """Write to a temporary name in the same folder, then rename: never a half-written file."""
    from safetensors.torch import save_file

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
