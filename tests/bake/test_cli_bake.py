"""`mwakit bake` on the command line: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from mwakit.cli import main
from tests.bake.reference import build_adapter


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(tiny_base, tmp_path_factory.mktemp("cli") / "adapter")


def _one_line_error(res: Result) -> str:
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_bake_writes_a_full_model(adapter: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "baked"
    res = _invoke("bake", str(adapter), "--base", str(tiny_base), "-o", str(out))
    assert res.exit_code == 0, res.output
    assert f"into {tiny_base}" in res.output and "14 of 21 tensors changed" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".mwakit-manifest.json",
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    manifest = json.loads((out / ".mwakit-manifest.json").read_text())
    assert sorted(manifest["files"]) == [n for n in names if not n.startswith(".")]
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "library_name: transformers" in card
    assert f"mwakit bake {adapter} --base {tiny_base} -o {out}" in card
    assert "| adapter | adapter_model.safetensors |" in card
    # A second bake onto the same folder needs --force, and then replaces it.
    again = _invoke("bake", str(adapter), "--base", str(tiny_base), "-o", str(out))
    assert "already exists" in _one_line_error(again)
    forced = _invoke("bake", str(adapter), "--base", str(tiny_base), "-o", str(out), "-f", "-q")
    assert forced.exit_code == 0 and forced.output == ""


def test_dtype_and_shards(adapter: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    res = _invoke(
        "bake", str(adapter), "--base", str(tiny_base), "-o", str(out),
        "--dtype", "bfloat16", "--shard-size", "30KB", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    tensors = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert sorted(tensors) == sorted(index["weight_map"])
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["torch_dtype"] == "bfloat16"


def test_bad_inputs_are_one_line_and_write_nothing(
    adapter: Path, tiny_base: Path, tmp_path: Path
) -> None:
    from make_run import make_tiny_llama

    out = tmp_path / "out"
    missing = _invoke("bake", str(adapter), "--base", str(tmp_path / "nope"), "-o", str(out))
    assert "base model folder not found" in _one_line_error(missing)
    no_adapter = _invoke(
        "bake", str(tmp_path / "nothing"), "--base", str(tiny_base), "-o", str(out)
    )
    assert "adapter folder not found" in _one_line_error(no_adapter)
    # Another model: wider layers (every ΔW has the wrong shape) or another vocabulary.
    wide = make_tiny_llama(tmp_path / "wide", hidden=48)
    shape = _invoke("bake", str(adapter), "--base", str(wide), "-o", str(out))
    line = _one_line_error(shape)
    assert "down_proj makes a ΔW of shape [32, 64], the base tensor" in line
    assert "is [48, 64]" in line and "fix: bake the adapter into the base model" in line
    other = make_tiny_llama(tmp_path / "vocab", vocab=96)
    head = build_adapter(other, tmp_path / "head-adapter", target_modules=["q_proj"],
                         modules_to_save=["lm_head"])  # fmt: skip
    mismatch = _invoke("bake", str(head), "--base", str(tiny_base), "-o", str(out))
    assert "lm_head.weight has shape [96, 32], the base's is [128, 32]" in _one_line_error(mismatch)
    # Output inside an input: refused before anything is created.
    inside = _invoke("bake", str(adapter), "--base", str(tiny_base), "-o", str(tiny_base / "x"))
    assert "inside the input folder" in _one_line_error(inside)
    bad_size = _invoke(
        "bake", str(adapter), "--base", str(tiny_base), "-o", str(out), "--shard-size", "lots"
    )
    assert bad_size.exit_code in (1, 2) and "Traceback" not in bad_size.output
    assert not out.exists() and not (tiny_base / "x").exists()
    assert not list(tmp_path.glob(".out.mwakit-*"))


def test_missing_option_is_usage_error(adapter: Path) -> None:
    res = CliRunner().invoke(main, ["bake", str(adapter), "-o", "x"])
    assert res.exit_code == 2 and "--base" in res.output


def test_unsupported_adapters_are_refused_with_the_reason(
    adapter: Path, tiny_base: Path, tmp_path: Path
) -> None:
    import shutil

    cases = {
        "ia3": ({"peft_type": "IA3"}, "peft_type IA3 is not LoRA"),
        "qalora": ({"use_qalora": True}, "use_qalora is set"),
        "pissa": ({"init_lora_weights": "pissa_niter_4"}, "moved part of the base weights"),
        "alora": ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens is set"),
    }
    for name, (patch, why) in cases.items():
        folder = tmp_path / name
        shutil.copytree(adapter, folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(patch)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        res = _invoke("bake", str(folder), "--base", str(tiny_base), "-o", str(tmp_path / "o"))
        line = _one_line_error(res)
        assert "cannot bake this adapter" in line and why in line, line
    assert not (tmp_path / "o").exists()


def test_tokenizer_from_base_else_from_the_adapter(
    adapter: Path, tiny_base: Path, tmp_path: Path
) -> None:
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = tmp_path / "checkpoint-5"
    shutil.copytree(adapter, ckpt)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(ckpt)
    res = _invoke("bake", str(ckpt), "--base", str(tiny_base), "-o", str(tmp_path / "o"), "-q")
    assert res.exit_code == 0, res.output
    loaded = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert loaded("t5 t7")["input_ids"] == [5, 7]
    # A base with a tokenizer of its own keeps it: the adapter's is not mixed in.
    base2 = tmp_path / "base2"
    shutil.copytree(tiny_base, base2)
    (base2 / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text())
    res = _invoke("bake", str(ckpt), "--base", str(base2), "-o", str(tmp_path / "p"), "-q")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "p" / "tokenizer_config.json").exists()
    assert (tmp_path / "p" / "tokenizer.json").is_file()


def test_a_nan_adapter_is_one_line_and_writes_nothing(
    adapter: Path, tiny_base: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    res = _invoke("bake", str(broken), "--base", str(tiny_base), "-o", str(out))
    line = _one_line_error(res)
    assert "the baked model.layers.1.mlp.up_proj.weight holds NaN or Inf" in line
    assert not out.exists() and not list(tmp_path.glob(".o.mwakit-*"))
