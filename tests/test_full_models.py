"""Full-model checkpoints: sharded inputs and outputs, base models, config and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mwakit
from mwakit.errors import PlanError
from mwakit.io.shards import split_shards
from mwakit.recipe import parse_recipe
from tests.methods import oracle


def _model(
    folder: Path, seed: int, *, shard: str | None = None, tied: bool = False
) -> dict[str, torch.Tensor]:
    """A tiny random Llama saved by transformers (sharded when ``shard`` is given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    kw: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(tmp: Path, folders: list[Path], **kw: Any) -> Any:
    return parse_recipe(
        {
            "checkpoints": [{"path": str(f)} for f in folders],
            "output": {"path": str(tmp / "out"), "overwrite": True},
            "device": "cpu",
            **kw,
        }
    )


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("full")
    folders = [root / f"m{i}" for i in range(3)]
    states = [_model(f, i, shard="20KB" if i == 1 else None) for i, f in enumerate(folders)]
    return folders, states


def test_linear_merge_of_full_models_is_exact_and_sharded(
    tmp_path: Path, models: tuple[list[Path], list[dict[str, torch.Tensor]]]
) -> None:
    folders, states = models
    assert (folders[1] / "model.safetensors.index.json").is_file(), "input 1 is sharded"
    recipe = _recipe(
        tmp_path,
        folders,
        method="linear",
        checkpoints=[
            {"path": str(f), "weight": w} for f, w in zip(folders, [1, 2, 5], strict=True)
        ],
        output={"path": str(tmp_path / "out"), "shard_size": "5KB"},
    )
    res = mwakit.run(recipe)
    out = res.path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") for s in shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    merged = _state(out)
    assert set(merged) == set(states[0])
    for k, t in merged.items():
        want = (states[0][k] + 2 * states[1][k] + 5 * states[2][k]) / 8
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values()
    )
    # The merged folder loads with transformers and has the config of the first checkpoint.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 16
    card = (out / "README.md").read_text()
    assert "library_name" in card


def test_out_dtype_and_single_shard(
    tmp_path: Path, models: tuple[list[Path], list[dict[str, torch.Tensor]]]
) -> None:
    folders, _ = models
    res = mwakit.run(_recipe(tmp_path, folders[:2], method="linear", out_dtype="bfloat16"))
    assert (res.path / "model.safetensors").is_file()
    assert not (res.path / "model.safetensors.index.json").exists()
    assert {t.dtype for t in _state(res.path).values()} == {torch.bfloat16}
    assert json.loads((res.path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_mixing_adapters_and_models_is_refused(
    tmp_path: Path, models: tuple[list[Path], list[dict[str, torch.Tensor]]], make_adapter: Any
) -> None:
    folders, _ = models
    adapter = make_adapter(tmp_path / "adapter", seed=0)
    with pytest.raises(PlanError, match="mix PEFT adapters and full models"):
        mwakit.plan(_recipe(tmp_path, [folders[0], adapter], method="linear"))


def test_shard_split_is_in_order_and_bounded() -> None:
    entries = [(f"t{i}", "F32", (10,)) for i in range(7)]  # 40 bytes each
    shards = split_shards(entries, 100)
    assert [[e[0] for e in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]]
    assert split_shards([("big", "F32", (100,))], 100) == [[("big", "F32", (100,))]]


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_tied_embeddings_stay_tied(tmp_path: Path, method: str) -> None:
    # save_pretrained drops lm_head.weight when it is tied to embed_tokens: the merge must
    # merge the one shared tensor once, write no lm_head, and transformers must re-tie it.
    from transformers import LlamaForCausalLM

    folders = [tmp_path / f"t{i}" for i in range(3)]
    states = [_model(f, 10 + i, tied=True) for i, f in enumerate(folders)]
    assert "lm_head.weight" not in _state(folders[0])
    kw: dict[str, Any] = {"method": "linear"}
    if method == "ties":
        kw = {"method": "ties", "params": {"density": 1.0}, "base_model": str(folders[0])}
    res = mwakit.run(_recipe(tmp_path, folders[1:] if method == "ties" else folders, **kw))
    out = _state(res.path)
    assert "lm_head.weight" not in out
    key = "model.embed_tokens.weight"
    if method == "linear":
        want = sum(s[key] for s in states) / 3
    else:  # density 1: sign election and disjoint mean of δ_1, δ_2 on θ_0 (the oracle)
        pair = [states[1][key], states[2][key]]
        want = oracle.merge(pair, [1.0, 1.0], states[0][key], consensus=True).float()
    torch.testing.assert_close(out[key], want, rtol=1e-6, atol=1e-6)
    model = LlamaForCausalLM.from_pretrained(res.path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight.detach(), want, rtol=1e-6, atol=1e-6)


def _bf16_models(root: Path, n: int) -> list[Path]:
    folders = []
    for i in range(n):
        f = root / f"b{i}"
        _model(f, 10 + i, shard="20KB" if i == 0 else None)
        sd = {k: v.to(torch.bfloat16) for k, v in _state(f).items()}
        for p in f.glob("*.safetensors"):
            p.unlink()
        (f / "model.safetensors.index.json").unlink(missing_ok=True)
        from safetensors.torch import save_file

        sd["model.layers.0.mlp.up_proj.weight"][0, :4] = torch.tensor([0.0, -0.0, -0.0, 1e4])
        save_file(sd, f / "model.safetensors", metadata={"format": "pt"})
        folders.append(f)
    return folders


@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [("float32", None), ("float32", "float16"), ("bfloat16", "float16"), ("float64", "float32")],
)
def test_a_linear_merge_written_from_the_writers_buffer_has_the_bytes_of_merge_then_cast(
    tmp_path: Path, dtype: str, out_dtype: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fused path (block sums cast into the writer's buffer) against the unfused one
    # (MemorySink: the method's merge, then the checked cast), byte for byte.
    from mwakit import execute as ex
    from mwakit.execute import MemorySink, execute

    fused: list[str] = []
    real = ex.weighted_sum_into
    monkeypatch.setattr(
        ex, "weighted_sum_into", lambda *a, **k: (fused.append(""), real(*a, **k))[1]
    )

    folders = _bf16_models(tmp_path, 3)
    kw: dict[str, Any] = {"dtype": dtype, **({"out_dtype": out_dtype} if out_dtype else {})}
    recipe = _recipe(
        tmp_path,
        folders,
        method="linear",
        checkpoints=[
            {"path": str(f), "weight": w} for f, w in zip(folders, [1, 2, 5], strict=True)
        ],
        output={"path": str(tmp_path / "out"), "shard_size": "5KB"},
        **kw,
    )
    res = mwakit.run(recipe)
    assert len(fused) == sum(1 for t in res.plan.tasks if not t.copy)  # type: ignore[union-attr]
    with MemorySink() as sink:
        execute(mwakit.plan(recipe), None, sink=sink)
    merged = _state(res.path)
    assert set(merged) == set(sink.tensors)
    for k, t in merged.items():
        want = sink.tensors[k]
        assert t.dtype == want.dtype, k
        assert torch.equal(t.view(torch.uint8), want.contiguous().view(torch.uint8)), k


def test_a_linear_merge_still_names_a_nan_input_and_an_overflowing_cast(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folders = _bf16_models(tmp_path, 2)
    sd = load_file(folders[1] / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_file(sd, folders[1] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mwakit.errors.TensorError, match="NaN or Inf") as exc:
        mwakit.run(_recipe(tmp_path, folders, method="linear"))
    assert "b1 model.layers.1.self_attn.q_proj.weight" in (exc.value.where or "")
    assert not (tmp_path / "out").exists()
    sd["model.layers.1.self_attn.q_proj.weight"][3, 3] = 1e6  # fits bf16, not float16
    save_file(sd, folders[1] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mwakit.errors.TensorError, match="do not fit float16"):
        mwakit.run(_recipe(tmp_path, folders, method="linear", out_dtype="float16"))
