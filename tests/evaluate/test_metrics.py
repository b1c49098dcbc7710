"""Every metric against values computed by hand from logits set by hand (`bigram_base`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mwakit.errors import DataError, MetricError
from mwakit.evaluate import Evaluator, load_rows, metric_direction, normalize, parse_metrics

from .conftest import ENDERS, EOS, bigram_logits, word

L = bigram_logits()
LOGP = torch.log_softmax(L, dim=-1)


def _nll(ids: list[int], targets: list[int]) -> float:
    """Summed NLL of the tokens at ``targets``, each predicted from the token before it."""
    return -sum(float(LOGP[ids[j - 1], ids[j]]) for j in targets)


def _words(ids: list[int]) -> str:
    return " ".join(word(i) for i in ids)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ev(bigram_base: Path) -> Evaluator:
    return Evaluator(
        bigram_base, metrics=["loss", "perplexity", "exact_match", "accuracy"], batch_tokens=24
    )


def _greedy(after: int) -> int:
    return int(L[after].argmax())


def test_loss_perplexity_on_completion_text_and_messages(ev: Evaluator, tmp_path: Path) -> None:
    rows = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "w6 w7", "completion": "w8 w9 w10"},
            {"text": "w20 w21 w22 w23"},
            {
                "messages": [
                    {"role": "user", "content": "w30 w31"},
                    {"role": "assistant", "content": "w32"},
                    {"role": "user", "content": "w33"},
                    {"role": "assistant", "content": "w34 w35"},
                ]
            },
        ],
    )
    ev.metrics = ["loss", "perplexity"]
    res = ev.score(load_rows(rows))
    # By hand: ids with BOS (2) where the tokenizer adds it; the scored positions.
    a = [2, 6, 7, 8, 9, 10]
    b = [2, 20, 21, 22, 23]
    # <|user|> w30 w31 </s> <|assistant|> w32 </s> <|user|> w33 </s> <|assistant|> w34 w35 </s>
    c = [4, 30, 31, EOS, 5, 32, EOS, 4, 33, EOS, 5, 34, 35, EOS]
    sums = [_nll(a, [3, 4, 5]), _nll(b, [1, 2, 3, 4]), _nll(c, [5, 6, 11, 12, 13])]
    counts = [3, 4, 5]
    loss = sum(sums) / sum(counts)
    assert res.metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert res.tokens == 12
    # Per-row scores: their mean is the metric, and they are the rows' sums × rows / tokens.
    assert res.per_row["loss"] == pytest.approx([s * 3 / 12 for s in sums], rel=1e-5)
    assert sum(res.per_row["loss"]) / 3 == pytest.approx(res.metrics["loss"], rel=1e-9)
    assert sum(res.per_row["perplexity"]) / 3 == pytest.approx(res.metrics["perplexity"])
    assert res.rows["loss"] == [0, 1, 2]


def _chain_to_eos() -> list[int]:
    """A greedy chain start → … → t, t in ENDERS (EOS follows), no EOS or ender before."""
    for start in range(6, 100):
        chain = [start]
        while len(chain) < 5 and chain[-1] not in ENDERS:
            chain.append(_greedy(chain[-1]))
        if chain[-1] in ENDERS and len(chain) >= 3 and min(chain) >= 6:
            return chain
    raise AssertionError("no chain reaches an ender")  # pragma: no cover


def test_exact_match_shortcut_and_accuracy_by_hand(ev: Evaluator, tmp_path: Path) -> None:
    chain = _chain_to_eos()
    wrong = 6 if chain[1] != 6 else 7
    # A choice row: score every choice by hand and find the winner.
    choices = [[40, 41], [42], [43, 44, 45]]
    lls = [-_nll([2, 7, *ch], list(range(2, 2 + len(ch)))) for ch in choices]
    best = max(range(3), key=lambda k: lls[k])
    rows = _jsonl(
        tmp_path / "d.jsonl",
        [
            # Ends with EOS: the shortcut. Reproduced iff argmax everywhere, EOS included.
            {"prompt": word(chain[0]), "completion": _words(chain[1:]) + " </s>"},
            {"prompt": word(chain[0]), "completion": _words([wrong, *chain[2:]]) + " </s>"},
            {"prompt": "w7", "choices": [_words(c) for c in choices], "label": best},
            {"prompt": "w7", "choices": [_words(c) for c in choices], "label": (best + 1) % 3},
        ],
    )
    ev.metrics = ["exact_match", "accuracy", "loss"]
    seqs = ev.encode(load_rows(rows))
    assert seqs[0].eos_terminated and seqs[1].eos_terminated
    res = ev.score(load_rows(rows))
    assert res.per_row["exact_match"] == [1.0, 0.0]
    assert res.rows["exact_match"] == [0, 1]
    assert res.per_row["accuracy"] == [1.0, 0.0]
    assert res.metrics["accuracy"] == 0.5
    # The loss of a choice row is that of its right choice.
    ch, other = choices[best], choices[(best + 1) % 3]
    tokens = 2 * len(chain) + len(ch) + len(other)
    assert res.per_row["loss"][2] * tokens / 4 == pytest.approx(
        _nll([2, 7, *ch], list(range(2, 2 + len(ch)))), rel=1e-5
    )


def test_exact_match_without_eos_generates(ev: Evaluator, tmp_path: Path) -> None:
    chain = _chain_to_eos()
    # No EOS in the gold: the answer is generated. Greedy stops after the chain (EOS next)
    # and matches; a gold one token shorter does not match (greedy goes on).
    rows = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": word(chain[0]), "completion": "  " + _words(chain[1:])},
            {"prompt": word(chain[0]), "completion": _words(chain[1:-1])},
        ],
    )
    ev.metrics = ["exact_match"]
    seqs = ev.encode(load_rows(rows))
    assert not seqs[0].eos_terminated
    res = ev.score(load_rows(rows))
    assert res.per_row["exact_match"] == [1.0, 0.0]
    with ev.model.use(None) as model:
        texts = ev.generate(model, seqs)
    assert texts == [_words(chain[1:])] * 2


def test_plugin_metric_and_directions(
    ev: Evaluator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_metrics.py").write_text(
        "def count(model, tokenizer, rows):\n"
        "    return {'n_rows': len(rows), 'row_len': [len(r.text.split()) for r in rows]}\n"
        "count.directions = {'row_len': -1}\n"
    )
    monkeypatch.chdir(tmp_path)
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", [{"text": "w6 w7"}, {"text": "w6 w7 w8 w9"}]))
    ev.metrics = parse_metrics("loss,my_metrics:count")
    res = ev.score(rows)
    assert res.metrics["n_rows"] == 2.0
    assert res.metrics["row_len"] == 3.0 and res.per_row["row_len"] == [2.0, 4.0]
    assert metric_direction("row_len") == -1
    sys.modules.pop("my_metrics", None)


def test_directions_and_normalisation() -> None:
    assert metric_direction("loss") == -1 and metric_direction("perplexity") == -1
    assert metric_direction("exact_match") == 1 and metric_direction("accuracy") == 1
    assert metric_direction("val_nll") == -1 and metric_direction("rouge") == 1
    assert normalize("  Paris\u00a0 \n is ") == "Paris is"
    assert normalize("ﬁne") == "fine"  # NFKC
    assert normalize("Paris") != normalize("paris")


@pytest.mark.parametrize(
    ("names", "msg"),
    [
        ("loss,acuracy", "unknown metric 'acuracy'"),
        ("nosuchmodule_xyz:f", "cannot import plug-in module 'nosuchmodule_xyz'"),
        ("math:nosuch", "math has no function 'nosuch'"),
        (":f", "bad plug-in metric"),
        ("", "no metric given"),
    ],
)
def test_bad_metric_names(names: str, msg: str) -> None:
    with pytest.raises(MetricError, match=msg):
        parse_metrics(names)


def test_metric_without_rows_of_its_kind(ev: Evaluator, tmp_path: Path) -> None:
    ev.metrics = ["accuracy"]
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", [{"text": "w6 w7"}]))
    with pytest.raises(DataError, match="metric accuracy scores no row"):
        ev.score(rows)


def test_too_long_row(ev: Evaluator, tmp_path: Path) -> None:
    ev.metrics = ["loss"]
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(["w6"] * 80)}]))
    with pytest.raises(DataError, match=r"d.jsonl:1: the row is 81 tokens; the model takes"):
        ev.score(rows)
