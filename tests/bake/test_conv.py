"""Conv LoRA (and conv DoRA) baked like PEFT's merge_and_unload, on a small real conv net."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mwakit.bake import bake


class Net(nn.Module):
    """A 3×3 conv, a 1×1 conv, a Conv1d and a linear head: every conv path of PEFT's merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 6, 1)
        self.c1 = nn.Conv1d(6, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pw(torch.relu(self.conv(x))).mean(dim=3)
        return self.fc(self.c1(h).mean(dim=2))


def _setup(tmp: Path, use_dora: bool) -> tuple[Path, Path, Net]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    net = Net()
    base = tmp / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "toy-conv"}))
    cfg = LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["conv", "pw", "c1", "fc"],
        use_dora=use_dora,
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(Net(), cfg)
        pm.base_model.model.load_state_dict(net.state_dict(), strict=False)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.2)
        pm.save_pretrained(tmp / "adapter")
    return base, tmp / "adapter", net


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_bake_equals_peft(use_dora: bool, tmp_path: Path) -> None:
    from peft import PeftModel

    base, adapter, net = _setup(tmp_path, use_dora)
    res = bake(adapter, base, tmp_path / "out")
    ours = load_file(res.path / "model.safetensors")
    fresh = Net()
    fresh.load_state_dict(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(fresh, adapter).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    assert res.changed == 4
    x = torch.randn(2, 3, 6, 6)
    baked = Net()
    baked.load_state_dict(ours)
    assert not torch.allclose(baked(x), net(x))  # the adapter changed the model
