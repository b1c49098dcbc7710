"""The Evaluator: one loaded base model scoring candidate merges on the same rows.

One teacher-forced pass per batch gives every metric but generated exact matches: the
log-probability and the argmax at every scored position. Tokenisation is cached per rows, so
scoring many candidates on one data set tokenises it once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import DataError, SourceError, UsageError
from mwakit.evaluate import metrics as M
from mwakit.evaluate.data import Row
from mwakit.evaluate.model import LoadedModel, quiet, resolve_model_folder
from mwakit.evaluate.tokenize import Seq, batches, encode_rows

if TYPE_CHECKING:
    from mwakit.memory import MergedAdapter

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: Which row kinds each built-in metric scores.
_SCORED = {
    "loss": ("completion", "text", "messages", "choice"),
    "perplexity": ("completion", "text", "messages", "choice"),
    "exact_match": ("completion", "messages"),
    "accuracy": ("choice",),
}


@dataclass
class EvalResult:
    """Scores of one candidate on one set of rows.

    Attributes:
        metrics: ``{name: value}`` (a plug-in adds its own keys).
        per_row: ``{name: [score per scored row]}``: the metric is their mean, and lists of
            two candidates on the same rows pair up (for paired standard errors). Orient
            with `metric_direction`.
        rows: ``{name: indices of the rows each per-row score belongs to}``.
        seconds: Wall time of the scoring.
        swap_seconds: Of which putting the candidate in place (copying its tensors).
        tokens: Scored tokens.
        target: What was scored (set by `mwakit.evaluate.evaluate`).
        base: The base model it was scored on (set by `mwakit.evaluate.evaluate`).
    """

    metrics: dict[str, float]
    per_row: dict[str, list[float]] = field(default_factory=dict)
    rows: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    swap_seconds: float = 0.0
    tokens: int = 0
    target: str | None = None
    base: str | None = None

    def standard_errors(self) -> dict[str, float]:
        """The standard error of each metric that has per-row scores."""
        return {k: M.standard_error(v) for k, v in self.per_row.items()}

    def to_json(self) -> dict[str, object]:
        """The result as `mwakit eval --json` prints it (per-row scores left out)."""
        return {
            "target": self.target,
            "base": self.base,
            "metrics": self.metrics,
            "se": self.standard_errors(),
            "rows": {k: len(v) for k, v in self.per_row.items()},
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class _Token:
    """Teacher-forced results of one sequence at its scored positions."""

    logp: list[float]
    hit: list[bool]


class Evaluator:
    """Scores candidate merges on rows with one loaded base model.

    Args:
        base: The base model: a local folder or ``hf://org/repo[@rev][/sub]``.
        tokenizer: Where the tokenizer is (default: the base folder).
        metrics: Metric names (`mwakit.evaluate.metrics.BUILTIN` or ``module:function``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        batch_tokens: Padded tokens per forward pass (memory: batch_tokens × vocab logits).
        dtype: The compute dtype of the model.
        tokenizer_fallback: Where to look when ``tokenizer`` is None and the base folder has no
            tokenizer (an adapter folder with the tokenizer saved beside it).

    Raises:
        MetricError: An unknown metric or a plug-in that cannot be imported.
        SourceError: The base or tokenizer cannot be loaded.
        PlanError: CUDA was asked for but is not available.
    """

    def __init__(
        self,
        base: str | Path,
        *,
        tokenizer: str | Path | None = None,
        metrics: Sequence[str] = ("loss",),
        device: str = "cpu",
        batch_tokens: int = 2048,
        dtype: str = "float32",
        tokenizer_fallback: str | Path | None = None,
    ) -> None:
        import torch

        from mwakit.execute import resolve_device

        self.metrics = M.parse_metrics(metrics)
        if dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise UsageError(
                f"unknown dtype {dtype!r}",
                where="dtype",
                fix="use float32, bfloat16, float16 or float64",
            )
        self.device = resolve_device(device)
        self.batch_tokens = max(1, int(batch_tokens))
        folder = resolve_model_folder(base)
        self.model = LoadedModel(folder, self.device, getattr(torch, dtype))
        if tokenizer is not None:
            tok_folder = _tokenizer_folder(tokenizer)
        elif tokenizer_fallback is not None and not _has_tokenizer(folder):
            tok_folder = _tokenizer_folder(tokenizer_fallback)
            if not _has_tokenizer(tok_folder):
                raise SourceError(
                    f"no tokenizer files here, nor in {tok_folder}",
                    where=str(folder),
                    fix="save the tokenizer into the base folder, or pass --tokenizer FOLDER",
                )
        else:
            tok_folder = folder
        self.tokenizer = _load_tokenizer(tok_folder)
        self.eos_ids = _eos_ids(self.tokenizer, self.model.base)
        self.pad_id = _pad_id(self.tokenizer, self.eos_ids)
        self._cache: dict[tuple[Row, ...], list[Seq]] = {}
        #: Compute the output head only at the positions whose logits are scored (the model's
        #: ``logits_to_keep``), not at every position: the head of a 49k vocabulary is ~20 %
        #: of a 135M model's forward pass. False (or a model without it): every position.
        self.trim_logits = _keeps_logits(self.model.base)

    def encode(self, rows: Sequence[Row]) -> list[Seq]:
        """The rows' sequences, tokenised once per distinct rows.

        Raises:
            DataError: A row cannot be tokenised or is too long for the model.
        """
        key = tuple(rows)
        if key not in self._cache:
            max_len = getattr(self.model.config, "max_position_embeddings", None)
            self._cache[key] = encode_rows(
                rows, self.tokenizer, eos_ids=self.eos_ids, max_len=max_len
            )
        return self._cache[key]

    def score(self, rows: Sequence[Row], adapter: MergedAdapter | None = None) -> EvalResult:
        """Score a candidate (None: the base model) on ``rows``.

        Raises:
            DataError: No row is of a kind a metric scores, or a row cannot be tokenised.
            PlanError: The adapter does not fit the base model.
            MetricError: A plug-in failed or returned no finite numbers.
        """
        t0 = time.perf_counter()
        rows = list(rows)
        self._check_kinds(rows)
        seqs = self.encode(rows)
        t_swap = time.perf_counter()
        with self.model.use(adapter) as model:
            swap = time.perf_counter() - t_swap
            tok = self._forward(model, seqs)
            result = self._metrics(model, rows, seqs, tok)
        result.swap_seconds = swap
        result.seconds = time.perf_counter() - t0
        return result

    def _check_kinds(self, rows: list[Row]) -> None:
        kinds = {r.kind for r in rows}
        for m in self.metrics:
            if m in _SCORED and not kinds & set(_SCORED[m]):
                need = {"exact_match": "prompt/completion or messages", "accuracy": "choices"}
                raise DataError(
                    f"metric {m} scores no row of this data ({', '.join(sorted(kinds))} rows)",
                    where=rows[0].where.rsplit(":", 1)[0] if rows else "data",
                    fix=f"give {need.get(m, 'text')} rows, or choose another metric",
                )

    def _forward(self, model: Any, seqs: list[Seq]) -> list[_Token]:
        import torch

        out: list[_Token | None] = [None] * len(seqs)
        for batch in batches(seqs, self.batch_tokens):
            width = max(len(seqs[k].ids) for k in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for b, k in enumerate(batch):
                s = seqs[k]
                ids[b, : len(s.ids)] = torch.tensor(s.ids)
                mask[b, : len(s.ids)] = 1
                scored[b, list(s.targets)] = True
            ids, mask, scored = ids.to(self.device), mask.to(self.device), scored.to(self.device)
            # Position j is predicted by the logits at j - 1 (right padding: positions agree).
            src = scored[:, 1:]
            if self.trim_logits:
                # Only the positions some row scores; boolean indexing still runs row-major,
                # each row's targets in order, as over every position.
                keep = src.any(dim=0).nonzero().squeeze(1)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                sel = logits[src[:, keep]].float()
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                sel = logits[:, :-1][src].float()
            gold = ids[:, 1:][src]
            logp = sel.gather(1, gold[:, None]).squeeze(1) - torch.logsumexp(sel, dim=-1)
            hit = sel.argmax(dim=-1) == gold
            logp_l, hit_l = logp.tolist(), hit.tolist()
            pos = 0
            for k in batch:  # boolean indexing runs row-major: each row's targets in order
                n = len(seqs[k].targets)
                out[k] = _Token(logp_l[pos : pos + n], hit_l[pos : pos + n])
                pos += n
        return [t for t in out if t is not None]

    def _metrics(
        self, model: Any, rows: list[Row], seqs: list[Seq], tok: list[_Token]
    ) -> EvalResult:
        by_row: dict[int, list[int]] = {}
        for k, s in enumerate(seqs):
            by_row.setdefault(s.row, []).append(k)
        # The sequence whose tokens the loss scores: the row's own, or the right choice.
        lm = {
            i: ks[rows[i].label or 0] if rows[i].kind == "choice" else ks[0]
            for i, ks in by_row.items()
        }
        res = EvalResult(metrics={}, tokens=sum(len(t.logp) for t in tok))
        want = set(self.metrics)
        if want & {"loss", "perplexity"}:
            idx = sorted(lm)
            sums = [-sum(tok[lm[i]].logp) for i in idx]
            counts = [len(tok[lm[i]].logp) for i in idx]
            loss, per = M.loss_scores(sums, counts)
            if "loss" in want:
                res.metrics["loss"], res.per_row["loss"], res.rows["loss"] = loss, per, idx
            if "perplexity" in want:
                ppl, pper = M.perplexity_scores(loss, per)
                res.metrics["perplexity"], res.per_row["perplexity"] = ppl, pper
                res.rows["perplexity"] = idx
        if "exact_match" in want:
            idx = [i for i in sorted(by_row) if rows[i].kind in _SCORED["exact_match"]]
            em = self._exact_match(model, [seqs[lm[i]] for i in idx], [tok[lm[i]] for i in idx])
            res.metrics["exact_match"], res.per_row["exact_match"] = M.mean(em), em
            res.rows["exact_match"] = idx
        if "accuracy" in want:
            idx = [i for i in sorted(by_row) if rows[i].kind == "choice"]
            acc = []
            for i in idx:
                lls = [sum(tok[k].logp) for k in by_row[i]]
                acc.append(float(max(range(len(lls)), key=lambda c: (lls[c], -c)) == rows[i].label))
            res.metrics["accuracy"], res.per_row["accuracy"], res.rows["accuracy"] = (
                M.mean(acc),
                acc,
                idx,
            )
        for spec in (m for m in self.metrics if ":" in m):
            for key, v in M.run_plugin(spec, model, self.tokenizer, rows).items():
                if isinstance(v, list):
                    res.metrics[key], res.per_row[key] = M.mean(v), v
                    res.rows[key] = list(range(len(v)))
                else:
                    res.metrics[key] = v
        return res

    def _exact_match(self, model: Any, seqs: list[Seq], tok: list[_Token]) -> list[float]:
        out: list[float | None] = []
        todo: list[int] = []
        for n, (s, t) in enumerate(zip(seqs, tok, strict=True)):
            if s.answer is None:
                out.append(0.0)
            elif s.eos_terminated:
                # Greedy decoding reproduces an EOS-ended answer iff the argmax at every one of
                # its positions is its token: no generation needed.
                a, b = s.answer
                hits = [h for p, h in zip(s.targets, t.hit, strict=True) if a <= p < b]
                out.append(float(len(hits) == b - a and all(hits)))
            else:
                out.append(None)
                todo.append(n)
        if todo:
            answers = self.generate(model, [seqs[n] for n in todo])
            for n, text in zip(todo, answers, strict=True):
                s = seqs[n]
                assert s.answer is not None
                gold = self.tokenizer.decode(
                    list(s.ids[s.answer[0] : s.answer[1]]), skip_special_tokens=True
                )
                out[n] = float(M.normalize(text) == M.normalize(gold))
        return [x if x is not None else 0.0 for x in out]

    def generate(self, model: Any, seqs: list[Seq]) -> list[str]:
        """Greedy answers to each sequence's prompt (its tokens before the answer).

        Generation stops at an EOS token or `GEN_SLACK` tokens past the gold answer's length;
        the text is decoded without special tokens. Batched with left padding.
        """
        import torch
        from transformers import GenerationConfig

        out: list[str] = [""] * len(seqs)
        prompts = [list(s.ids[: s.answer[0]]) if s.answer else [] for s in seqs]
        sizes = [(s.answer[1] - s.answer[0]) if s.answer else 0 for s in seqs]
        order = sorted(range(len(seqs)), key=lambda k: -len(prompts[k]))
        chunks: list[list[int]] = []
        for k in order:  # batch_tokens bounds prompt + answer tokens per batch
            if chunks:
                cur = chunks[-1]
                width = len(prompts[cur[0]]) + max(sizes[j] for j in [*cur, k]) + M.GEN_SLACK
                if (len(cur) + 1) * width <= self.batch_tokens:
                    cur.append(k)
                    continue
            chunks.append([k])
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        for chunk in chunks:
            width = max(len(prompts[k]) for k in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, k in enumerate(chunk):
                p = prompts[k]
                if p:
                    ids[b, width - len(p) :] = torch.tensor(p)
                    mask[b, width - len(p) :] = 1
            new = max(sizes[k] for k in chunk) + M.GEN_SLACK
            if max_pos is not None:
                new = max(1, min(new, max_pos - width))
            cfg = GenerationConfig(
                do_sample=False,
                max_new_tokens=new,
                eos_token_id=sorted(self.eos_ids) or None,
                pad_token_id=self.pad_id,
            )
            with quiet():
                gen = model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=cfg,
                )
            for b, k in enumerate(chunk):
                # Each row's own limit: a batch generates for its longest answer.
                toks = gen[b, width:].tolist()[: sizes[k] + M.GEN_SLACK]
                cut = next((n for n, t in enumerate(toks) if t in self.eos_ids), len(toks))
                out[k] = self.tokenizer.decode(toks[:cut], skip_special_tokens=True)
        return out


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` as positions (transformers' causal
    LMs do; a custom model may not)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _tokenizer_folder(ref: str | Path) -> Path:
    text = str(ref)
    if not text.startswith("hf://"):
        return Path(text)
    from mwakit import hub

    try:
        return hub.download(hub.parse_hf_ref(text))[0]
    except ValueError as err:
        raise SourceError(str(err), where=text, fix="write hf://org/repo[@rev]") from err


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer(folder: Path) -> Any:
    if not _has_tokenizer(folder):
        raise SourceError(
            "no tokenizer files",
            where=str(folder),
            fix="save the tokenizer into the base folder, or pass --tokenizer FOLDER",
        )
    from transformers import AutoTokenizer

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise SourceError(
            f"could not load the tokenizer: {err}",
            where=str(folder),
            fix="repair the tokenizer files, or pass --tokenizer FOLDER",
        ) from err


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(x) for x in eos)
    return frozenset(ids)


def _pad_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    # Padding is masked out and never scored: any id works; EOS is what generate() expects.
    return min(eos_ids) if eos_ids else 0
