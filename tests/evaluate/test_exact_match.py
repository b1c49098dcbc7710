"""The exact-match shortcut equals real greedy generation, on the tiny random Llama + a LoRA.

The random model rarely emits ``</s>``, so the EOS of this test is the word greedy decoding
emits most often: then some gold answers are reproduced and end at EOS, others are not.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from mwakit.evaluate import Evaluator, load_rows, normalize
from mwakit.evaluate.target import resolve_target

from ..conftest import MakeAdapter
from .conftest import save_tokenizer, word

PROMPTS = [[6 + (7 * i + 3 * j) % 90 for j in range(2 + i % 3)] for i in range(6)]


def _greedy(model: object, ids: list[int], n: int, eos: int | None) -> list[int]:
    out = model.generate(  # type: ignore[attr-defined]
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=1,
    )
    return [int(x) for x in out[0, len(ids) :]]


def test_shortcut_equals_greedy_generation(
    tok_base: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    from make_run import load_base
    from peft import PeftModel

    adapter = make_adapter(tmp_path / "a", seed=7)
    model = PeftModel.from_pretrained(load_base(tok_base), adapter).eval()
    prompts = [[2, *p] for p in PROMPTS]  # BOS, as the tokenizer adds it
    with torch.no_grad():
        free = [_greedy(model, p, 8, None) for p in prompts]
    eos = Counter(t for g in free for t in g if t >= 6).most_common(1)[0][0]
    base = tmp_path / "eos-base"
    shutil.copytree(tok_base, base)
    save_tokenizer(base, eos_token=word(eos))
    cfg = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))

    rows = []
    for p, g in zip(PROMPTS, free, strict=True):
        prompt = " ".join(word(t) for t in p)
        k = g.index(eos) if eos in g else 3
        if k == 0:
            continue
        answer = [t if t >= 6 else 6 for t in g[:k]]
        rows.append({"prompt": prompt, "completion": " ".join(map(word, [*answer, eos]))})
        # The same answer with its first token changed: never reproduced.
        first = next(t for t in (6 + (answer[0] - 6 + d) % 122 for d in (1, 2)) if t != eos)
        bad = [first, *answer[1:]]
        rows.append({"prompt": prompt, "completion": " ".join(map(word, [*bad, eos]))})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(data)

    ev = Evaluator(base, metrics=["exact_match"])
    seqs = ev.encode(loaded)
    assert all(s.eos_terminated for s in seqs)
    got = ev.score(loaded, resolve_target(adapter, base).adapter).per_row["exact_match"]

    # Real greedy generation, one row at a time, stopping at EOS; compared as text.
    want, texts = [], []
    with torch.no_grad():
        for s, r in zip(seqs, rows, strict=True):
            assert s.answer is not None
            gen = _greedy(model, list(s.ids[: s.answer[0]]), s.answer[1] - s.answer[0] + 16, eos)
            text = " ".join(word(t) for t in gen if t != eos and t >= 6)
            gold = " ".join(r["completion"].split()[:-1])
            want.append(float(normalize(text) == normalize(gold) and gen[-1] == eos))
            cut = gen.index(eos) if eos in gen else len(gen)
            texts.append(ev.tokenizer.decode(gen[:cut], skip_special_tokens=True))
    assert got == want
    assert 0 < sum(got) < len(got), "both outcomes occur"

    # The same golds without their EOS: exact match generates (batched, left-padded) and
    # reaches the same verdicts, through the same greedy answers.
    data.write_text(
        "".join(
            json.dumps({**r, "completion": r["completion"].rsplit(" ", 1)[0]}) + "\n" for r in rows
        )
    )
    plain = load_rows(data)
    assert not any(s.eos_terminated for s in ev.encode(plain))
    candidate = resolve_target(adapter, base).adapter
    assert ev.score(plain, candidate).per_row["exact_match"] == want
    with ev.model.use(candidate) as m:
        assert ev.generate(m, ev.encode(loaded)) == texts
