"""The README's "Merge at the end of training" and "In memory, on a PeftModel" snippets, run
as written: only the names the snippet assumes (model, args, data, base, adapter folders) are
supplied, by a real tiny Trainer run and real adapter folders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .conftest import build_trainer

ROOT = Path(__file__).resolve().parents[2]


def snippet(heading: str) -> str:
    """The first python block under a README heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None, heading
    return m.group(1)


@pytest.mark.slow
def test_merge_at_the_end_of_training(tmp_path: Path, tiny_base: Path) -> None:
    from make_run import _one_thread, _preserved_rng, _quiet

    # The snippet's model, args and data: those of a real (short) Trainer run.
    made = build_trainer(tmp_path / "run", tiny_base, [], steps=6, save_steps=2)
    ns: dict[str, Any] = {
        "model": made.model,
        "args": made.args,
        "train": made.train_dataset,
        "val": made.eval_dataset,
        "print": lambda *a: None,
    }
    with _quiet(), _preserved_rng(), _one_thread():
        exec(snippet("Merge at the end of training"), ns)
    merged = tmp_path / "run" / "merged"
    assert ns["merge"].result.path == merged
    assert (merged / "adapter_model.safetensors").is_file()
    assert [c.name for c in ns["merge"].result.plan.checkpoints] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_in_memory_on_a_peft_model(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from make_run import load_base

    from tests.test_peft_api import _model

    adapters = tmp_path / "adapters"
    src = _model(tiny_base, {"math": {"r": 4, "lora_alpha": 8}, "code": {"r": 8, "lora_alpha": 8}})
    src.save_pretrained(adapters)  # adapters/math, adapters/code
    code = snippet("In memory, on a PeftModel").replace('"adapters/', f'"{adapters}/')
    ns: dict[str, Any] = {"base": load_base(tiny_base)}
    exec(code, ns)
    model = ns["model"]
    assert set(model.peft_config) == {"math", "code", "both", "diff", "ties"}
    assert model.active_adapter == "both"
    with torch.no_grad():
        out = model(input_ids=torch.arange(8).reshape(1, 8)).logits
    assert torch.isfinite(out).all()
