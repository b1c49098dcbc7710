"""examples/make_run.py builds real Trainer runs: the layout, the state and the tensors.

Every run here is trained by the real `transformers.Trainer` on CPU, offline. The runs are
module-scoped fixtures so the tests share two small trainings (10 steps, save every 5).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers loads: nothing may reach the network
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import make_run as mr  # found through the path above

pytestmark = [
    pytest.mark.slow,
    # Raised inside PeftModel.from_pretrained by transformers 5; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

STEPS, SAVE = 10, 5
FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json")


def _tensors(folder: Path) -> dict[str, Any]:
    """All tensors of a checkpoint's adapter_model.safetensors."""
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "trainer_state.json").read_text())


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default LoRA (r=4, alpha=8, all linear modules), 10 steps."""
    return mr.make_run(tmp_path_factory.mktemp("plain") / "run", steps=STEPS, save_steps=SAVE)


@pytest.fixture(scope="module")
def rslora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rslora with alpha != r and a fully trained lm_head (modules_to_save)."""
    return mr.make_run(
        tmp_path_factory.mktemp("rslora") / "run",
        steps=STEPS,
        save_steps=SAVE,
        use_rslora=True,
        lora_alpha=16,
        modules_to_save=["lm_head"],
    )


def test_layout(run: Path) -> None:
    assert run.name == "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-10",
        "checkpoint-5",
    ]
    for step in (5, 10):
        ckpt = run / f"checkpoint-{step}"
        for name in FILES:
            assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
        # The Trainer's own extras are there too (save_only_model=False): a merger must skip them.
        assert (ckpt / "optimizer.pt").is_file()
    base = run.parent / "base"
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()


def test_trainer_state(run: Path) -> None:
    for step in (5, 10):
        state = _state(run / f"checkpoint-{step}")
        assert state["global_step"] == step
        assert state["max_steps"] == STEPS and state["save_steps"] == SAVE
        log = state["log_history"]
        losses = [e for e in log if "loss" in e]
        evals = [e for e in log if "eval_loss" in e]
        # logging_steps=1: one train entry per step so far; eval at every multiple of 5.
        assert [e["step"] for e in losses] == list(range(1, step + 1))
        assert [e["step"] for e in evals] == list(range(SAVE, step + 1, SAVE))
        assert all(math.isfinite(e["loss"]) for e in losses)
        assert all(math.isfinite(e["eval_loss"]) for e in evals)
        assert {"grad_norm", "learning_rate", "epoch"} <= set(losses[-1])
    evals = [
        e["eval_loss"] for e in _state(run / "checkpoint-10")["log_history"] if "eval_loss" in e
    ]
    assert evals[1] < evals[0], "the synthetic pattern is learnable: eval loss must fall"


def test_tensors(run: Path) -> None:
    from safetensors import safe_open

    t5, t10 = _tensors(run / "checkpoint-5"), _tensors(run / "checkpoint-10")
    prefix = "base_model.model.model.layers."
    expected = {
        f"{prefix}{layer}.{block}.{module}.lora_{ab}.weight"
        for layer in range(2)
        for block, modules in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for module in (f"{m}_proj" for m in modules)
        for ab in "AB"
    }
    assert set(t10) == expected
    assert t10[f"{prefix}0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert t10[f"{prefix}0.self_attn.k_proj.lora_B.weight"].shape == (16, 4)  # 2 kv heads
    assert t10[f"{prefix}0.mlp.down_proj.lora_A.weight"].shape == (4, 64)
    # PEFT starts lora_B at zero: training must have moved every one, and between checkpoints.
    for key in (k for k in expected if "lora_B" in k):
        assert t5[key].abs().max() > 1e-3 and t10[key].abs().max() > 1e-3, key
        assert not t5[key].equal(t10[key]), key
    with safe_open(run / "checkpoint-10" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_adapter_config(run: Path) -> None:
    cfg = _config(run / "checkpoint-5")
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["use_dora"]) == (4, 8, False, False)
    assert sorted(cfg["target_modules"]) == sorted(mr.LLAMA_MODULES)
    assert cfg["base_model_name_or_path"] == str((run.parent / "base").resolve())


def test_peft_loads_checkpoint(run: Path) -> None:
    import torch
    from peft import PeftModel

    ckpt = run / "checkpoint-10"
    base = _config(ckpt)["base_model_name_or_path"]
    model = PeftModel.from_pretrained(mr.load_base(base), ckpt)
    saved = _tensors(ckpt)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(saved)  # nothing missing, nothing unexpected
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    out = model(input_ids=torch.arange(8).unsqueeze(0)).logits
    assert out.shape == (1, 8, mr.VOCAB) and torch.isfinite(out).all()


def test_rslora_lm_head_loads(rslora_run: Path) -> None:
    import torch
    from peft import PeftModel

    ckpt = rslora_run / "checkpoint-10"
    cfg = _config(ckpt)
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 16, True)
    assert cfg["modules_to_save"] == ["lm_head"]
    saved = _tensors(ckpt)
    # modules_to_save is stored in full under the module's original path.
    head = saved["base_model.model.lm_head.weight"]
    assert head.shape == (mr.VOCAB, 32)
    base = mr.load_base(cfg["base_model_name_or_path"])
    assert not torch.equal(head, base.lm_head.weight), "lm_head was trained"
    model: Any = PeftModel.from_pretrained(base, ckpt)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / math.sqrt(4))
    assert torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight, head)


def test_pure_function_of_arguments(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Same arguments give the same tensors; the seed changes them; nothing is printed."""
    import random

    import torch

    random.seed(123)
    torch.manual_seed(123)
    before = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)

    kw: dict[str, Any] = {"steps": 2, "save_steps": 2, "eval_steps": None}
    a = mr.make_run(tmp_path / "a", base_dir=tmp_path / "base-a", **kw)
    b = mr.make_run(tmp_path / "b", base_dir=tmp_path / "base-b", **kw)
    c = mr.make_run(tmp_path / "c", base_dir=tmp_path / "base-a", seed=1, **kw)
    ta, tb, tc = (_tensors(p / "checkpoint-2") for p in (a, b, c))
    assert ta.keys() == tb.keys() == tc.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)

    out, err = capfd.readouterr()
    assert out == "" and err == ""
    # The caller's global RNG streams are untouched by the Trainer's reseeding.
    assert (random.random(), torch.rand(1)) == before


def test_tiny_llama_is_deterministic_and_checked(tmp_path: Path) -> None:
    import torch

    a = mr.load_base(mr.make_tiny_llama(tmp_path / "a", seed=3))
    b = mr.load_base(mr.make_tiny_llama(tmp_path / "b", seed=3))
    c = mr.load_base(mr.make_tiny_llama(tmp_path / "c", seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert a.config.tie_word_embeddings is False
    assert (a.config.hidden_size, a.config.num_hidden_layers, a.config.vocab_size) == (32, 2, 128)
    # Reusing is fine with the same arguments, refused with others.
    assert mr.make_tiny_llama(tmp_path / "a", seed=3) == tmp_path / "a"
    with pytest.raises(ValueError, match="seed"):
        mr.make_tiny_llama(tmp_path / "a", seed=5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_cli_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--steps", "2", "--save-steps", "1", "--eval-steps", "0"]
    assert mr.main(argv) == 0
    made = capsys.readouterr().out
    assert "checkpoint-1, checkpoint-2" in made
    assert (tmp_path / "base" / "config.json").is_file()
    first = _tensors(tmp_path / "run" / "checkpoint-2")

    assert mr.main(argv) == 0
    assert "skipping" in capsys.readouterr().out

    assert mr.main([*argv, "--force", "--alpha", "16", "--rslora"]) == 0
    cfg = _config(tmp_path / "run" / "checkpoint-2")
    assert cfg["lora_alpha"] == 16 and isinstance(cfg["lora_alpha"], int) and cfg["use_rslora"]
    # Same seed, data and init: only the scaling differs, so training moved B differently.
    second = _tensors(tmp_path / "run" / "checkpoint-2")
    assert first.keys() == second.keys()
    assert not all(first[k].equal(second[k]) for k in first)


@pytest.mark.parametrize("variant", ["dora", "lora_bias"])  # PEFT refuses the two together
def test_variants_and_patterns_load(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], variant: str
) -> None:
    """DoRA / lora_bias and the rank and alpha patterns reach the adapter; PEFT loads it back."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = mr.make_run(
            tmp_path / "run",
            steps=2,
            save_steps=2,
            eval_steps=None,
            use_dora=variant == "dora",
            lora_bias=variant == "lora_bias",
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 4},
            target_modules=["q_proj", "v_proj"],
        )
    # Silent, PEFT's lora_bias warnings included (a false ZeRO-3 alarm on save among them).
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr() == ("", "")
    ckpt = run / "checkpoint-2"
    cfg = _config(ckpt)
    assert (cfg["use_dora"], cfg["lora_bias"]) == (variant == "dora", variant == "lora_bias")
    assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == ({"q_proj": 2}, {"v_proj": 4})
    saved = _tensors(ckpt)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert saved[f"{q}.lora_A.weight"].shape == (2, 32)  # rank_pattern
    if variant == "dora":  # one magnitude per output feature, no ".weight" on disk
        assert saved[f"{q}.lora_magnitude_vector"].shape == (32,)
        assert not any(k.endswith("lora_B.bias") for k in saved)
    else:
        assert saved[f"{q}.lora_B.bias"].shape == (32,)
        assert not any("lora_magnitude_vector" in k for k in saved)
    base = mr.load_base(cfg["base_model_name_or_path"])
    with contextlib.ExitStack() as stack:
        if variant == "lora_bias":  # Llama's Linear has no bias for PEFT to fold lora_B.bias into
            stack.enter_context(pytest.warns(UserWarning, match="lora_bias=True"))
        model: Any = PeftModel.from_pretrained(base, ckpt)
    v = model.base_model.model.model.layers[1].self_attn.v_proj
    assert v.scaling["default"] == pytest.approx(4 / 4)  # alpha_pattern over r=4


def test_mwakit_init_on_the_folder_make_run_writes(run: Path, tmp_path: Path) -> None:
    """`mwakit init OUT` on make_run.py's OUT_DIR (OUT/base beside OUT/run) finds OUT/run."""
    import yaml
    from click.testing import CliRunner

    from mwakit.cli import main

    out_dir = run.parent
    assert sorted(p.name for p in out_dir.iterdir()) == ["base", "run"]
    res = CliRunner().invoke(main, ["init", str(out_dir), "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    assert doc["checkpoints"] == [str(run / f"checkpoint-{s}") for s in (5, 10)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(res.stdout)
    res = CliRunner().invoke(main, ["run", "-q", str(recipe)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
