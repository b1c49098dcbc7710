"""The executor never writes into the tensors it reads, for every method and space.

With an `InputCache` every tensor the reader hands out is the cache's own memory, kept for the
next merge: after merging, each held tensor must still be, byte for byte, what its file holds.
That covers the whole path — `_run_full`, `_run_lora` (factor averages, per-factor methods,
ΔW methods re-factorised, concatenated or written full rank), the pre-passes (Fisher norms,
whole-model thresholds) — for every registered method in every space it allows, with and
without a base model, computing in float32 and bfloat16 on float32 and bfloat16 inputs. The
method functions alone are checked in tests/methods/test_inputs_unchanged.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import mwakit.methods  # noqa: F401  (registers every method)
from mwakit.io.cache import InputCache
from mwakit.memory import merge_in_memory
from mwakit.methods.registry import _REGISTRY
from mwakit.recipe import parse_recipe

from .conftest import MakeAdapter

N = 3


def _full(folder: Path, seed: int, dtype: torch.dtype) -> Path:
    """A small 'model' folder: a few weights of mixed shapes, plus a Fisher beside it."""
    g = torch.Generator().manual_seed(seed)
    ts = {
        "model.embed.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.up.weight": torch.randn(12, 8, generator=g),
        "model.layers.0.mlp.up.bias": torch.randn(12, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
    }
    ts = {k: v.to(dtype) for k, v in ts.items()}
    folder.mkdir(parents=True)
    save_file(ts, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({k: v.float().abs() for k, v in ts.items()}, folder / "fisher.safetensors")
    return folder


def _fisher_beside(adapter: Path) -> None:
    from safetensors.torch import load_file

    ts = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.abs() for k, v in ts.items()}, adapter / "fisher.safetensors")


@pytest.fixture(scope="module")
def folders(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("inputs")
    out: dict[str, Any] = {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt)[6:]
        out[f"full-{name}"] = [_full(root / name / f"m{i}", i + 1, dt) for i in range(N)]
        out[f"base-{name}"] = _full(root / name / "base", 99, dt)
    adapters = []
    for i in range(N):
        a = make_adapter(root / "lora" / f"checkpoint-{i + 1}", seed=i + 1)
        _fisher_beside(a)
        adapters.append(a)
    out["adapter"] = adapters
    return out


def _cases() -> list[Any]:
    out = []
    for name, m in _REGISTRY.items():
        lo, hi = m.inputs
        n = max(lo, min(N, hi if hi is not None else N))
        for space in m.spaces:
            kinds = ["full-float32", "full-bfloat16"] if space == "full" else ["adapter"]
            for kind in kinds:
                bases = [True] if m.needs_base and space == "full" else [False, True]
                if space != "full" or not (m.needs_base or m.uses_base):
                    bases = [False]
                ranks: list[int | str | None] = [None]
                if space == "delta":
                    ranks = [4, "concat", "full"] if m.linear else [4, "full"]
                for with_base in bases:
                    for dtype in ("float32", "bfloat16"):
                        for rank in ranks:
                            tag = f"{name}-{space}-{kind}-{dtype}" + ("-base" if with_base else "")
                            tag += "" if rank is None else f"-rank-{rank}"
                            args = (name, n, space, kind, with_base, dtype, rank)
                            out.append(pytest.param(*args, id=tag))
    return out


def _held_equal_files(cache: InputCache) -> int:
    """Each held tensor's bytes against its file's; returns how many were checked."""
    n = 0
    for file, (name, _, start, end), buf in cache.items():
        with open(file.real, "rb") as f:
            f.seek(start)
            want = f.read(end - start)
        assert bytes(buf.numpy()) == want, f"{name} of {file.real} was written into"
        n += 1
    return n


@pytest.mark.parametrize(("method", "n", "space", "kind", "with_base", "dtype", "rank"), _cases())
def test_merging_leaves_every_input_tensor_unchanged(
    folders: dict[str, Any],
    tmp_path: Path,
    method: str,
    n: int,
    space: str,
    kind: str,
    with_base: bool,
    dtype: str,
    rank: int | str | None,
) -> None:
    cks = folders[kind][:n]
    params: dict[str, Any] = {}
    if method == "fisher":
        params["normalize_fisher"] = True  # the pre-pass reads the Fishers too
    if "trim_scope" in _REGISTRY[method].params.model_fields:
        params["trim_scope"] = "model"  # the whole-model threshold pre-pass
    recipe: dict[str, Any] = {
        "method": method,
        "params": params,
        "checkpoints": [{"path": str(c), "metrics": {"loss": 1.0 + i}} for i, c in enumerate(cks)],
        "dtype": dtype,
        "device": "cpu",
        "output": {"path": str(tmp_path / "never")},
    }
    if space != "full":
        recipe["lora_space"] = space
        if space == "delta":
            recipe["delta_rank"] = rank
    if with_base:
        recipe["base_model"] = str(folders[f"base-{kind[5:]}"])
    cache = InputCache(1 << 30)
    merged = merge_in_memory(parse_recipe(recipe), cache=cache)
    assert merged.tensors and len(cache) > 0
    assert _held_equal_files(cache) == len(cache)
    for k, t in merged.tensors.items():
        assert not cache.owns(t), f"{k} shares the cache's memory"
    # A second merge from the cache gives the same bytes as the first.
    again = merge_in_memory(parse_recipe(recipe), cache=cache)
    assert cache.hits > 0
    for k, t in merged.tensors.items():
        assert torch.equal(t.view(torch.uint8), again.tensors[k].view(torch.uint8)), k
