"""The diagonal Fisher estimator on a tiny random Llama with real PEFT adapters, and the
estimate → `method: fisher` round trip through the planner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mwakit
from mwakit.errors import SourceError
from mwakit.fisher_estimate import estimate_fisher
from mwakit.methods import get_method
from mwakit.recipe import parse_recipe

from .conftest import MakeAdapter

pytestmark = pytest.mark.slow

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _id_rows(n: int = 6, length: int = 12) -> list[dict[str, Any]]:
    # The make_run pattern: t, t+k, t+2k, … (mod 128).
    return [
        {"input_ids": [(5 * i + (i % 3 + 1) * j) % 128 for j in range(length)]} for i in range(n)
    ]


@pytest.fixture(scope="module")
def adapter(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("fisher") / "checkpoint-10", seed=3)


@pytest.fixture(scope="module")
def base_with_tokenizer(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base plus a word-level tokenizer (no downloads), in a folder of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tok") / "base"
    shutil.copytree(tiny_base, out)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    return out


def _estimate(base: Path, adapter: Path, data: Path, tmp: Path, **kw: Any) -> dict[str, Any]:
    # Each estimate writes into a copy of the adapter so runs do not overwrite each other.
    folder = tmp / f"a{len(list(tmp.iterdir()))}"
    shutil.copytree(adapter, folder)
    return load_file(estimate_fisher(base, folder, data, **kw))


def test_keys_shapes_and_values(tiny_base: Path, adapter: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", _id_rows())
    out = estimate_fisher(tiny_base, adapter, data, max_examples=4)
    assert out == adapter / "fisher.safetensors"
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    fisher = load_file(out)
    assert list(fisher) == keys
    for k, v in fisher.items():
        assert list(v.shape) == shapes[k] and v.dtype == torch.float32
        assert torch.isfinite(v).all() and (v >= 0).all(), k
    assert any(bool(v.any()) for v in fisher.values())
    assert all(bool(v.any()) for k, v in fisher.items() if "lora_B" in k)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["mwakit_fisher"] == "empirical" and meta["examples"] == "4"
    assert not [p for p in adapter.iterdir() if p.name.endswith(".tmp")]


def test_fisher_matches_a_hand_computed_squared_gradient(
    tiny_base: Path, adapter: Path, tmp_path: Path
) -> None:
    # One example: F = (∂/∂θ Σ_t log p(y_t | y_<t))², computed here with plain autograd.
    from make_run import load_base
    from peft import PeftModel

    row = _id_rows(1)[0]
    fisher = _estimate(tiny_base, adapter, _jsonl(tmp_path / "d.jsonl", [row]), tmp_path)
    model = PeftModel.from_pretrained(load_base(tiny_base), adapter, is_trainable=True).eval()
    ids = torch.tensor([row["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    ll = logp.gather(1, ids[0, 1:].unsqueeze(1)).sum()
    name = next(n for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    (g,) = torch.autograd.grad(ll, [dict(model.named_parameters())[name]])
    torch.testing.assert_close(fisher[name.replace(".default", "")], g.square())


def test_deterministic_for_a_seed(tiny_base: Path, adapter: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", _id_rows(4))
    runs = tmp_path / "runs"
    runs.mkdir()
    a = _estimate(tiny_base, adapter, data, runs)
    b = _estimate(tiny_base, adapter, data, runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    s1 = _estimate(tiny_base, adapter, data, runs, empirical=False, seed=1)
    s1_again = _estimate(tiny_base, adapter, data, runs, empirical=False, seed=1)
    s2 = _estimate(tiny_base, adapter, data, runs, empirical=False, seed=2)
    assert all(torch.equal(s1[k], s1_again[k]) for k in s1)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], a[k]) for k in s1)


def test_labels_mask_and_max_examples(tiny_base: Path, adapter: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = _id_rows(3)
    full = _estimate(tiny_base, adapter, _jsonl(tmp_path / "a.jsonl", rows), runs)
    masked_rows = [{**r, "labels": [-100] * 6 + r["input_ids"][6:]} for r in rows]
    masked = _estimate(tiny_base, adapter, _jsonl(tmp_path / "b.jsonl", masked_rows), runs)
    assert any(not torch.allclose(full[k], masked[k]) for k in full)
    # An example without label tokens is skipped, not counted: the mean is over 3 examples.
    skipped = [{"input_ids": [1], "labels": [1]}, *rows]
    again = _estimate(tiny_base, adapter, _jsonl(tmp_path / "c.jsonl", skipped), runs)
    assert all(torch.equal(full[k], again[k]) for k in full)
    first = _estimate(tiny_base, adapter, _jsonl(tmp_path / "e.jsonl", rows), runs, max_examples=1)
    one = _estimate(tiny_base, adapter, _jsonl(tmp_path / "f.jsonl", rows[:1]), runs)
    assert all(torch.equal(first[k], one[k]) for k in first)


def test_prompt_completion_only_completion_tokens_are_labels(
    base_with_tokenizer: Path, adapter: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    runs = tmp_path / "runs"
    runs.mkdir()
    pairs = [("the cat sat on", "a mat"), ("the dog ran", "far away home")]
    as_text = [{"text": f"{p} {c}"} for p, c in pairs]
    as_pc = [{"prompt": p, "completion": " " + c} for p, c in pairs]
    text = _estimate(base_with_tokenizer, adapter, _jsonl(tmp_path / "t.jsonl", as_text), runs)
    pc = _estimate(base_with_tokenizer, adapter, _jsonl(tmp_path / "p.jsonl", as_pc), runs)
    assert any(not torch.allclose(text[k], pc[k]) for k in text)
    # The same as input_ids with the prompt's labels masked by hand.
    tok = AutoTokenizer.from_pretrained(base_with_tokenizer)
    as_ids = []
    for p, c in pairs:
        pi, ci = tok(p)["input_ids"], tok(" " + c, add_special_tokens=False)["input_ids"]
        as_ids.append({"input_ids": pi + ci, "labels": [-100] * len(pi) + ci})
    ids = _estimate(base_with_tokenizer, adapter, _jsonl(tmp_path / "i.jsonl", as_ids), runs)
    assert all(torch.equal(pc[k], ids[k]) for k in pc)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([json.dumps({"text": "the cat"})], "needs a tokenizer"),
        ([json.dumps({"prompt": "a", "completion": "b"})], "needs a tokenizer"),
        (["{not json"], "not JSON"),
        ([json.dumps({"input_ids": [1, 2, 999]})], "outside"),
        ([json.dumps({"input_ids": [1, 2], "labels": [1]})], "equal-length"),
        ([json.dumps({"foo": 1})], "no usable fields"),
        ([json.dumps({"input_ids": [7]})], "no example has a label token"),
    ],
)
def test_data_errors(
    tiny_base: Path, adapter: Path, tmp_path: Path, lines: list[str], match: str
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=match) as exc:
        estimate_fisher(tiny_base, adapter, data, out_name="bad.safetensors")
    assert exc.value.where is not None
    assert not (adapter / "bad.safetensors").exists()


def test_folder_errors(tiny_base: Path, adapter: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", _id_rows(1))
    with pytest.raises(SourceError, match=r"config\.json"):
        estimate_fisher(tmp_path, adapter, data)
    with pytest.raises(SourceError, match=r"adapter_config\.json"):
        estimate_fisher(tiny_base, tmp_path, data)
    with pytest.raises(SourceError, match="data file"):
        estimate_fisher(tiny_base, adapter, tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="max_examples"):
        estimate_fisher(tiny_base, adapter, data, max_examples=0)


def test_estimate_then_merge_with_method_fisher(
    tiny_base: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "d.jsonl", _id_rows(3))
    folders = [make_adapter(tmp_path / f"checkpoint-{i}", seed=10 + i) for i in (1, 2)]
    fishers = [load_file(estimate_fisher(tiny_base, f, data)) for f in folders]
    recipe = parse_recipe(
        {
            "method": "fisher",
            "params": {"normalize_fisher": True},
            "checkpoints": [{"path": str(folders[0]), "weight": 1}, {"path": str(folders[1])}],
            "output": {"path": str(tmp_path / "out")},
            "device": "cpu",
        }
    )
    res = mwakit.run(recipe)
    merged = load_file(res.path / "adapter_model.safetensors")
    inputs = [load_file(f / "adapter_model.safetensors") for f in folders]
    norms = [sum(float(t.double().square().sum()) for t in f.values()) ** 0.5 for f in fishers]
    method = get_method("fisher")
    params = method.params(normalize_fisher=True)
    assert list(merged) == list(inputs[0])
    for k, v in merged.items():
        want = method.merge(
            [x[k] for x in inputs],
            [0.5, 0.5],
            params,
            fishers=[f[k] for f in fishers],
            fisher_norms=norms,
        )
        torch.testing.assert_close(v, want)
