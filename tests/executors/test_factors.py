"""executors.factors: the torch-free factor average writes the torch executor's bytes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mwakit
from mwakit.errors import SourceError, TensorError
from mwakit.execute import execute
from mwakit.executors import factors
from mwakit.executors.factors import _round, execute_factors, fits
from mwakit.planner import FullTask
from mwakit.recipe import parse_recipe

from ..conftest import trainer_state, write_trainer_state

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "base_model.model.model.layers"
#: (name, in, out): one module larger than the executor's block, so blocks and tails run.
MODULES = [("self_attn.q_proj", 16, 16), ("mlp.up_proj", 24, 40), ("mlp.down_proj", 4500, 8)]


def lora_only(
    folder: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    loss: float = 1.0,
) -> None:
    """A PEFT adapter folder holding LoRA factors only (no modules_to_save, no buffers)."""
    g = torch.Generator().manual_seed(seed)
    ts: dict[str, torch.Tensor] = {}
    for layer in range(2):
        for name, fin, fout in MODULES:
            m = f"{PREFIX}.{layer}.{name}"
            ts[f"{m}.lora_A.weight"] = torch.randn(r, fin, generator=g).to(dtype)
            ts[f"{m}.lora_B.weight"] = torch.randn(fout, r, generator=g).to(dtype)
            if bias:
                ts[f"{m}.lora_B.bias"] = torch.randn(fout, generator=g).to(dtype)
    # Values that stress the roundings: signed zeros, a subnormal, ties of bf16.
    first = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    ts[first].view(-1)[:4] = torch.tensor([-0.0, 0.0, 1e-40, 1.00390625]).to(dtype)
    folder.mkdir(parents=True)
    save_file(ts, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": "tiny/base",
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
        "lora_bias": bias,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True, indent=2))
    write_trainer_state(folder, trainer_state(10 * (seed + 1), [(10 * (seed + 1), loss)]))


def _run_both(plan: Any, tmp: Path) -> tuple[bytes, bytes]:
    a, b = tmp / "numpy", tmp / "torch"
    a.mkdir()
    b.mkdir()
    execute_factors(plan, a)
    execute(plan, b)
    return (
        (a / "adapter_model.safetensors").read_bytes(),
        (b / "adapter_model.safetensors").read_bytes(),
    )


def _folders(tmp: Path, n: int, **kw: Any) -> list[Path]:
    out = []
    for i in range(n):
        f = tmp / f"c{i}"
        # Different α per checkpoint: B's fold s_i / s_out is not 1.
        lora_only(f, seed=i, alpha=8 * (i + 1), loss=1.0 / (i + 1), **kw)
        out.append(f)
    return out


def _recipe(tmp: Path, folders: list[Path], weights: list[float] | None = None, **kw: Any) -> Any:
    cks: list[Any] = [str(f) for f in folders]
    if weights is not None:
        cks = [{"path": c, "weight": w} for c, w in zip(cks, weights, strict=True)]
    return parse_recipe(
        {
            "checkpoints": cks,
            "output": {"path": str(tmp / "out"), "overwrite": True},
            **kw,
        }
    )


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("compute", "out"),
    [
        ("float32", None),
        ("float32", "bfloat16"),
        ("float32", "float16"),
        ("bfloat16", "float32"),
        ("float16", None),
        ("bfloat16", "float16"),
    ],
)
def test_same_bytes_as_the_torch_executor(
    tmp_path: Path, in_dtype: torch.dtype, compute: str, out: str | None
) -> None:
    folders = _folders(tmp_path, 3, dtype=in_dtype, bias=True)
    extra = {"out_dtype": out} if out else {}
    plan = mwakit.plan(_recipe(tmp_path, folders, dtype=compute, device="cpu", **extra))
    assert fits(plan)
    got, want = _run_both(plan, tmp_path)
    assert got == want


@pytest.mark.parametrize(
    "method",
    [
        {"method": "mwa", "params": {"metric": "loss", "penalty": 0.5}},
        # A zero weight (skipped, as torch skips it) and a negative one.
        {"method": "linear", "params": {"normalize": False}, "weights": [0.0, 2.5, -0.75]},
        {"method": "linear"},  # a uniform soup
    ],
)
def test_same_bytes_for_every_linear_method(tmp_path: Path, method: dict[str, Any]) -> None:
    folders = _folders(tmp_path, 3, dtype=torch.bfloat16)
    plan = mwakit.plan(_recipe(tmp_path, folders, device="auto", **method))
    assert fits(plan)
    got, want = _run_both(plan, tmp_path)
    assert got == want


def test_plans_it_does_not_take(tmp_path: Path) -> None:
    folders = _folders(tmp_path, 2)
    assert not fits(mwakit.plan(_recipe(tmp_path, folders, dtype="float64")))
    assert not fits(mwakit.plan(_recipe(tmp_path, folders, lora_space="delta")))
    ties = {"method": "ties", "lora_space": "delta", "delta_rank": 4}
    assert not fits(mwakit.plan(_recipe(tmp_path, folders, **ties)))
    plan = mwakit.plan(_recipe(tmp_path, folders))
    assert fits(plan)  # device: auto
    on_cuda = dataclasses.replace(plan, recipe=plan.recipe.model_copy(update={"device": "cuda"}))
    assert not fits(on_cuda)
    with pytest.raises(ValueError, match="torch executor"):
        execute_factors(mwakit.plan(_recipe(tmp_path, folders, **ties)), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_to_save_and_integer_buffers_too(tmp_path: Path, dtype: torch.dtype) -> None:
    from ..test_execute import write_adapter

    for i in range(3):
        write_adapter(tmp_path / f"c{i}", modules=4, seed=i, loss=1.0 + i, dtype=dtype)
    folders = [tmp_path / f"c{i}" for i in range(3)]
    plan = mwakit.plan(_recipe(tmp_path, folders, device="cpu", out_dtype="bfloat16"))
    kinds = {type(t).__name__ + ("-copy" if getattr(t, "copy", False) else "") for t in plan.tasks}
    assert kinds == {"LoraTask", "FullTask", "FullTask-copy"}  # lm_head, and an int buffer
    assert fits(plan)
    got, want = _run_both(plan, tmp_path)
    assert got == want


def test_a_full_tensor_with_a_base_goes_to_torch(tmp_path: Path) -> None:
    from ..test_execute import write_adapter

    for i in range(2):
        write_adapter(tmp_path / f"c{i}", modules=2, seed=i, loss=1.0 + i)
    plan = mwakit.plan(_recipe(tmp_path, [tmp_path / "c0", tmp_path / "c1"], device="cpu"))
    full = next(t for t in plan.tasks if isinstance(t, FullTask) and not t.copy)
    odd = dataclasses.replace(full, base=full.inputs[0])
    assert fits(plan)
    assert not fits(dataclasses.replace(plan, tasks=(*plan.tasks, odd)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_roundings_match_torch(bits: list[int]) -> None:
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    t = torch.from_numpy(x.copy())
    bf16 = _round(x, "BF16")
    assert bf16.tobytes() == t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert _round(x, "F16").tobytes() == t.to(torch.float16).numpy().tobytes()
    # bf16 → f16 and bf16 → f32, as the compute dtype then the written one round them.
    via = t.to(torch.bfloat16)
    assert _round(bf16, "F16").tobytes() == via.to(torch.float16).numpy().tobytes()
    assert _round(bf16, "F32").tobytes() == via.to(torch.float32).numpy().tobytes()


def test_a_non_finite_input_fails_as_the_torch_executor_fails(tmp_path: Path) -> None:
    folders = _folders(tmp_path, 2)
    f = folders[1] / "adapter_model.safetensors"
    from safetensors.torch import load_file

    ts = load_file(f)
    key = f"{PREFIX}.1.mlp.up_proj.lora_B.weight"
    ts[key][3, 1] = float("nan")
    save_file(ts, f, metadata={"format": "pt"})
    plan = mwakit.plan(_recipe(tmp_path, folders, device="cpu"))
    assert fits(plan)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(TensorError) as got:
        execute_factors(plan, out)
    with pytest.raises(TensorError) as want:
        execute(plan, out)
    assert str(got.value) == str(want.value)
    assert "holds NaN or Inf" in str(got.value) and str(got.value).startswith("c1 ")


def test_overflow_of_the_written_dtype_fails_as_the_torch_executor_fails(tmp_path: Path) -> None:
    folders = _folders(tmp_path, 2)
    plan = mwakit.plan(
        _recipe(
            tmp_path,
            folders,
            device="cpu",
            out_dtype="float16",
            method="linear",
            params={"normalize": False},
            weights=[1e5, 1e5],
        )
    )
    assert fits(plan)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(TensorError, match="do not fit float16"):
        execute_factors(plan, out)


def test_a_file_that_shrank_is_a_source_error(tmp_path: Path) -> None:
    folders = _folders(tmp_path, 2)
    plan = mwakit.plan(_recipe(tmp_path, folders, device="cpu"))
    f = folders[1] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(SourceError, match="past the end of the file") as err:
        execute_factors(plan, out)
    assert err.value.where == str(f)


def test_progress_and_stats(tmp_path: Path) -> None:
    folders = _folders(tmp_path, 2, bias=True)
    plan = mwakit.plan(_recipe(tmp_path, folders, device="cpu"))
    seen: list[int] = []
    out = tmp_path / "o"
    out.mkdir()
    stats = execute_factors(plan, out, on_task=lambda i, t: seen.append(i))
    assert seen == list(range(len(plan.tasks)))
    (tmp_path / "t").mkdir()
    want = execute(plan, tmp_path / "t")
    assert stats.device == "cpu" and stats.tasks == want.tasks == len(plan.tasks)
    assert (stats.bytes_read, stats.bytes_written) == (want.bytes_read, want.bytes_written)
    assert stats.max_live_inputs == want.max_live_inputs == 6  # A, B, bias of 2 checkpoints


def test_memory_stays_at_one_module_whatever_the_module_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    from mwakit.io.durable import ALIGN

    from ..test_execute import write_adapter

    monkeypatch.setattr(factors, "_STAGE", 4 * ALIGN)  # small stages: the peak is the modules'
    peaks = {}
    for modules in (8, 64):
        folders = [tmp_path / f"{modules}-c{i}" for i in range(4)]
        for i, f in enumerate(folders):
            write_adapter(f, modules=modules, seed=i, loss=1.0 + i, dim=1024, r=8)
        plan = mwakit.plan(_recipe(tmp_path, folders, device="cpu"))
        assert fits(plan)
        out = tmp_path / f"o{modules}"
        out.mkdir()
        tracemalloc.start()
        execute_factors(plan, out)
        peaks[modules] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 8× the modules (16 MiB read instead of 2), the same peak: one module's inputs (4 × 64
    # KiB), its sums and the staging buffers, never the whole adapter.
    assert peaks[64] < 1.25 * peaks[8] < (2 << 20), peaks


def test_mwakit_run_merges_lora_factors_without_importing_torch(tmp_path: Path) -> None:
    folders = _folders(tmp_path, 2, dtype=torch.bfloat16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"checkpoints: [{folders[0]}, {folders[1]}]\noutput: {tmp_path}/out\n", encoding="utf-8"
    )
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mwakit.cli import main\n"
        f"r = CliRunner().invoke(main, ['run', '-q', '{recipe}'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'matplotlib' not in sys.modules\n"  # the card's plot is drawn with Pillow
    )
    env = {"HF_HUB_OFFLINE": "1", "MWAKIT_CACHE": "off", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120, env=env)
    # The folder is the one the torch executor writes: same weights file, card, config.
    plan = mwakit.plan(recipe)
    (tmp_path / "t").mkdir()
    execute(plan, tmp_path / "t")
    name = "adapter_model.safetensors"
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()
    assert (tmp_path / "out" / "README.md").is_file()
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_the_executor_module_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import mwakit.executors.factors, mwakit.io.hashing, mwakit.io.files\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    assert factors.__name__ == "mwakit.executors.factors"


@pytest.mark.parametrize("order", ["file", "reversed", "shuffled", "one-late"])
@pytest.mark.parametrize("syncer", [False, True])
@pytest.mark.parametrize("direct", [True, False])
def test_output_file_is_the_torch_writers_whatever_the_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str, syncer: bool, direct: bool
) -> None:
    import random

    from mwakit.io import durable
    from mwakit.io.durable import ALIGN, BackgroundSync
    from mwakit.io.writer import StreamingWriter

    # Stages of two blocks: tensors straddle stages and blocks; one spans several stages.
    monkeypatch.setattr(factors, "_STAGE", 2 * ALIGN)
    if not direct:
        real = durable.open_output
        monkeypatch.setattr(factors, "open_output", lambda p, d: real(p, False))
    g = torch.Generator().manual_seed(0)
    ts = {
        f"t{i:02d}": torch.randn(n, generator=g).to(dt)
        for i, (n, dt) in enumerate(
            [(1, torch.float32), (700, torch.bfloat16), (5 * ALIGN, torch.float32)]
            + [(37 * k + 1, torch.float16) for k in range(12)]
            + [(0, torch.float32), (2 * ALIGN, torch.float32)]
        )
    }
    entries = [(k, _code(t), tuple(t.shape)) for k, t in ts.items()]
    meta = {"format": "pt", "note": "x"}
    want = tmp_path / "want.safetensors"
    with StreamingWriter(want, entries, meta) as w:
        for k, t in ts.items():
            w.write(k, t)
    from mwakit.io.filelayout import header_bytes

    _, offsets = header_bytes(entries, meta)
    names = sorted(ts, key=lambda k: offsets[k][0])  # file order
    if order == "reversed":
        names = names[::-1]
    elif order == "shuffled":
        random.Random(1).shuffle(names)
    elif order == "one-late":
        names = names[:3] + names[4:] + names[3:4]
    got = tmp_path / "got.safetensors"
    with BackgroundSync() as s:
        with factors._Output(got, entries, meta, s if syncer else None) as out:
            for k in names:
                t = ts[k]
                out.write(k, t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8))
        s.join()
    assert got.read_bytes() == want.read_bytes()


def _code(t: torch.Tensor) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype]


def test_output_missing_a_tensor_is_an_output_error(tmp_path: Path) -> None:
    from mwakit.errors import OutputError

    entries = [("a", "F32", (3,)), ("b", "F32", (2,))]
    path = tmp_path / "x.safetensors"
    with (
        pytest.raises(OutputError, match="never written"),
        factors._Output(path, entries, {}, None) as out,
    ):
        out.write("a", np.zeros(3, np.float32))
