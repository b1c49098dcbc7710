"""`mwakit.peft.merge_adapters`: the exact in-memory merge on a loaded PeftModel.

Every case is checked against ΔW computed by hand from the loaded adapters' own factors and
scalings (s = α/r, α/√r with rsLoRA, per module through rank_pattern/alpha_pattern), against
PEFT's ``add_weighted_adapter(combination_type="cat")`` where that is exact (plain LoRA, any
weights), and against the adapter file ``mwakit run`` writes for the same recipe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import mwakit
from mwakit.errors import MwakitError, PlanError, RecipeError, UsageError
from mwakit.methods import get_method
from mwakit.methods.registry import CheckpointView
from mwakit.peft import merge_adapters
from mwakit.recipe import parse_recipe


def _model(base: Path, configs: dict[str, dict[str, Any]], seed: int = 0) -> Any:
    """A PeftModel with one adapter per entry, every LoRA factor random (ΔW ≠ 0)."""
    from make_run import load_base, lora_config
    from peft import get_peft_model

    names = list(configs)
    model = get_peft_model(load_base(base), lora_config(**configs[names[0]]), names[0])
    for n in names[1:]:
        model.add_adapter(n, lora_config(**configs[n]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname or "modules_to_save" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _delta(layer: Any, adapter: str) -> torch.Tensor:
    """ΔW = s·B·A by hand, in float64, from the layer's factors and scaling."""
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * (b @ a)


def _scaling_by_hand(cfg: dict[str, Any], module: str) -> float:
    import re

    def pick(pattern: dict[str, Any], default: float) -> float:
        for k, v in pattern.items():
            if re.match(rf"(.*\.)?({k})$", module):
                return float(v)
        return default

    r = pick(cfg.get("rank_pattern") or {}, cfg.get("r", 4))
    alpha = pick(cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _check_exact(
    model: Any, name: str, adapters: list[str], coeffs: list[float], *, tol: float = 1e-6
) -> int:
    """Every module's merged ΔW equals Σ c_i ΔW_i; returns how many modules were compared."""
    n = 0
    for layer in _lora_layers(model).values():
        if name not in layer.lora_A:
            continue
        want = sum(c * _delta(layer, a) for a, c in zip(adapters, coeffs, strict=True))
        got = _delta(layer, name)
        assert isinstance(want, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
        n += 1
    return n


PLAIN = {"r": 4, "lora_alpha": 8}
ALL_MODULES = 14  # 7 linear modules x 2 layers of the tiny Llama


def test_linear_concat_is_exact_and_equals_peft_cat(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": {"r": 2, "lora_alpha": 16}})
    res = merge_adapters(model, ["first", "second"], [3.0, 1.0], name="ours")
    # linear normalises the weights, as in a recipe.
    assert res.weights == {"first": 0.75, "second": 0.25}
    assert _check_exact(model, "ours", ["first", "second"], [0.75, 0.25]) == ALL_MODULES
    model.add_weighted_adapter(["first", "second"], [0.75, 0.25], "cat", combination_type="cat")
    for layer in _lora_layers(model).values():
        torch.testing.assert_close(
            _delta(layer, "ours"), _delta(layer, "cat"), rtol=1e-5, atol=1e-7
        )
    # Merged factors carry every s_i: the new adapter has scaling 1 and rank Σr.
    layer = next(iter(_lora_layers(model).values()))
    assert layer.scaling["ours"] == 1.0 and layer.r["ours"] == 6


def test_negative_weights_raw_coefficients(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN}, seed=1)
    merge_adapters(model, ["first", "second"], [1.0, -1.0], normalize=False, name="diff")
    assert _check_exact(model, "diff", ["first", "second"], [1.0, -1.0]) == ALL_MODULES
    model.add_weighted_adapter(["first", "second"], [1.0, -1.0], "cat", combination_type="cat")
    for layer in _lora_layers(model).values():
        torch.testing.assert_close(
            _delta(layer, "diff"), _delta(layer, "cat"), rtol=1e-5, atol=1e-7
        )


def test_weights_summing_to_zero_are_refused_when_normalised(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN})
    with pytest.raises(MwakitError) as err:
        merge_adapters(model, ["first", "second"], [1.0, -1.0])
    assert "normalize" in err.value.message
    assert "merged" not in model.peft_config  # nothing half-added


def test_rslora_mixed_with_plain_is_exact(tiny_base: Path) -> None:
    cfgs = {"rs": {"r": 4, "lora_alpha": 8, "use_rslora": True}, "plain": {"r": 8, "lora_alpha": 4}}
    model = _model(tiny_base, cfgs, seed=2)
    # The hand scalings: α/√r for rsLoRA, α/r otherwise.
    layer = next(iter(_lora_layers(model).values()))
    assert layer.scaling["rs"] == pytest.approx(8 / 2) and layer.scaling["plain"] == 0.5
    merge_adapters(model, ["rs", "plain"], [0.5, 0.5], name="m")
    assert _check_exact(model, "m", ["rs", "plain"], [0.5, 0.5]) == ALL_MODULES


def test_rank_and_alpha_patterns_are_exact_and_equal_peft_cat(tiny_base: Path) -> None:
    patterned = {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"q_proj": 8, "down_proj": 2},
        "alpha_pattern": {"v_proj": 2, "q_proj": 32},
    }
    model = _model(tiny_base, {"pat": patterned, "plain": PLAIN}, seed=3)
    for mname, layer in _lora_layers(model).items():
        assert layer.scaling["pat"] == pytest.approx(_scaling_by_hand(patterned, mname))
    merge_adapters(model, ["pat", "plain"], [0.6, -0.4], normalize=False, name="m")
    assert _check_exact(model, "m", ["pat", "plain"], [0.6, -0.4]) == ALL_MODULES
    model.add_weighted_adapter(["pat", "plain"], [0.6, -0.4], "cat", combination_type="cat")
    for layer in _lora_layers(model).values():
        torch.testing.assert_close(_delta(layer, "m"), _delta(layer, "cat"), rtol=1e-5, atol=1e-7)
    ranks = {n.rsplit(".", 1)[-1]: layer.r["m"] for n, layer in _lora_layers(model).items()}
    assert ranks["q_proj"] == 12 and ranks["down_proj"] == 6 and ranks["k_proj"] == 8


def test_refactorised_rank_is_the_best_rank_k(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN}, seed=4)
    res = merge_adapters(model, ["first", "second"], delta_rank=3, name="r3")
    for mname, layer in _lora_layers(model).items():
        want = 0.5 * _delta(layer, "first") + 0.5 * _delta(layer, "second")
        s = torch.linalg.svdvals(want)
        tail = float(s[3:].square().sum().sqrt())
        err = float(torch.linalg.matrix_norm(_delta(layer, "r3") - want))
        assert err == pytest.approx(tail, rel=1e-4, abs=1e-7)
        module = mname.removeprefix("base_model.model.")
        rel = res.stats.rel_errors["base_model.model." + module]
        assert rel == pytest.approx(tail / float(s.square().sum().sqrt()), rel=1e-4, abs=1e-7)
        assert layer.r["r3"] == 3


def test_ties_full_rank_equals_the_method_on_hand_deltas(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN, "third": PLAIN}, seed=5)
    merge_adapters(
        model, ["first", "second", "third"], method="ties", delta_rank="full", density=0.5, name="t"
    )
    ties = get_method("ties")
    params = ties.params.model_validate({"density": 0.5})
    names = ["first", "second", "third"]
    for mname, layer in _lora_layers(model).items():
        deltas = [_delta(layer, a).float() for a in names]
        weights = ties.weigh(params, [CheckpointView(a, {}, None) for a in names])
        want = ties.merge(deltas, weights, params, key=mname)
        torch.testing.assert_close(_delta(layer, "t").float(), want, rtol=1e-5, atol=1e-6)


def test_factor_space_averages_a_and_b(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": {"r": 4, "lora_alpha": 16}}, seed=6)
    merge_adapters(model, ["first", "second"], [0.25, 0.75], lora_space="factors", name="f")
    for layer in _lora_layers(model).values():
        s1, s2 = layer.scaling["first"], layer.scaling["second"]
        a = 0.25 * layer.lora_A["first"].weight + 0.75 * layer.lora_A["second"].weight
        # B̄ = Σ w_i (s_i/s_out) B_i with s_out the first adapter's scaling.
        b = 0.25 * layer.lora_B["first"].weight + 0.75 * (s2 / s1) * layer.lora_B["second"].weight
        torch.testing.assert_close(layer.lora_A["f"].weight, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.lora_B["f"].weight, b, rtol=1e-6, atol=1e-7)
        assert layer.scaling["f"] == s1


def test_mwa_weights_from_metrics(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN}, seed=7)
    res = merge_adapters(
        model,
        ["first", "second"],
        method="mwa",
        metrics={"first": {"eval_loss": 2.0}, "second": {"eval_loss": 1.0}},
        metric="eval_loss",
        penalty=2.0,
        name="mwa",
    )
    # q_i = 1/loss_i, w_i = q_i^p / Σ q_j^p: (1/4) / (1/4 + 1) = 0.2.
    assert res.weights == pytest.approx({"first": 0.2, "second": 0.8})
    assert _check_exact(model, "mwa", ["first", "second"], [0.2, 0.8]) == ALL_MODULES


def test_modules_to_save_are_averaged(tiny_base: Path) -> None:
    cfg = {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}
    model = _model(tiny_base, {"first": cfg, "second": cfg}, seed=8)
    merge_adapters(model, ["first", "second"], [0.5, 0.5], name="m")
    head = model.base_model.model.lm_head
    want = 0.5 * head.modules_to_save["first"].weight + 0.5 * head.modules_to_save["second"].weight
    torch.testing.assert_close(head.modules_to_save["m"].weight, want, rtol=1e-6, atol=1e-7)


def test_equals_the_adapter_mwakit_run_writes(tiny_base: Path, tmp_path: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    cfgs = {
        "first": {"r": 4, "lora_alpha": 8, "use_rslora": True},
        "second": {"r": 2, "lora_alpha": 4},
    }
    model = _model(tiny_base, cfgs, seed=9)
    merge_adapters(model, ["first", "second"], [0.3, 0.7], name="ours")
    model.save_pretrained(tmp_path / "saved", selected_adapters=["first", "second"])
    res = mwakit.run(
        parse_recipe(
            {
                "method": "linear",
                "checkpoints": [
                    {"path": str(tmp_path / "saved" / "first"), "weight": 0.3},
                    {"path": str(tmp_path / "saved" / "second"), "weight": 0.7},
                ],
                "lora_space": "delta",
                "device": "cpu",
                "output": {"path": str(tmp_path / "run")},
            }
        )
    )
    written = load_file(str(res.path / "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(model, adapter_name="ours")
    assert set(ours) == set(written)
    for k, t in written.items():
        assert torch.equal(ours[k], t), k


def test_merged_adapter_is_usable_and_round_trips(tiny_base: Path, tmp_path: Path) -> None:
    from make_run import load_base
    from peft import PeftModel

    model = _model(tiny_base, {"first": PLAIN, "second": {"r": 2, "lora_alpha": 8}}, seed=10)
    merge_adapters(model, ["first", "second"], name="m")
    assert model.active_adapter == "first"  # the merge does not switch adapters
    ids = torch.arange(12).reshape(2, 6) % 16
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.set_adapter("m")
        merged = model(input_ids=ids).logits
    assert not torch.allclose(before, merged)
    model.save_pretrained(tmp_path / "out", selected_adapters=["m"])
    again = PeftModel.from_pretrained(load_base(tiny_base), tmp_path / "out" / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged, rtol=1e-5, atol=1e-6)
    # The merged forward is the base plus Σ w_i ΔW_i: fold it into a copy of the base by hand.
    base = load_base(tiny_base)
    with torch.no_grad():
        for mname, layer in _lora_layers(model).items():
            target = base.get_submodule(mname.removeprefix("base_model.model."))
            target.weight += (0.5 * _delta(layer, "first") + 0.5 * _delta(layer, "second")).float()
        torch.testing.assert_close(base(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"adapters": ["first", "nope"]}, UsageError, "no adapter named 'nope'"),
        ({"adapters": ["first", "first"]}, UsageError, "listed twice"),
        ({"adapters": []}, UsageError, "non-empty list"),
        ({"adapters": ["first", "second"], "name": "second"}, UsageError, "already has"),
        ({"adapters": ["first", "second"], "weights": [1.0]}, UsageError, "1 weights for 2"),
        ({"adapters": ["first", "second"], "method": "ties"}, RecipeError, "delta_rank"),
        ({"adapters": ["first", "second"], "method": "nope"}, RecipeError, "unknown method"),
        ({"adapters": ["first", "second"], "metrics": [{}]}, UsageError, "1 metrics entries"),
    ],
)
def test_refusals_are_one_line(
    tiny_base: Path, kwargs: dict[str, Any], error: type[MwakitError], text: str
) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN})
    with pytest.raises(error) as err:
        merge_adapters(model, **kwargs)
    assert text in err.value.message and "\n" not in err.value.message
    assert set(model.peft_config) == {"first", "second"}


def test_not_a_peft_model(tiny_base: Path) -> None:
    from make_run import load_base

    with pytest.raises(UsageError, match=r"needs a peft\.PeftModel"):
        merge_adapters(load_base(tiny_base), ["a"])


def test_factor_space_refuses_different_ranks(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": {"r": 2, "lora_alpha": 8}})
    with pytest.raises(PlanError, match="ranks differ"):
        merge_adapters(model, ["first", "second"], lora_space="factors")


def test_peft_cat_on_rslora_against_ours(tiny_base: Path) -> None:
    # The README's claim about add_weighted_adapter: up to PEFT 0.21 the merged config
    # inherits use_rslora, so α = r = Σr scales by √(Σr) instead of 1; PEFT 0.22 writes the
    # merged adapter with use_rslora off, and its exact `cat` then equals ours.
    from importlib.metadata import version

    from packaging.version import Version

    rs = {"r": 4, "lora_alpha": 8, "use_rslora": True}
    model = _model(tiny_base, {"first": rs, "second": rs}, seed=11)
    merge_adapters(model, ["first", "second"], name="ours")
    model.add_weighted_adapter(["first", "second"], [0.5, 0.5], "cat", combination_type="cat")
    assert _check_exact(model, "ours", ["first", "second"], [0.5, 0.5]) == ALL_MODULES
    off = math.sqrt(8) if Version(version("peft")) < Version("0.22") else 1.0
    for layer in _lora_layers(model).values():
        torch.testing.assert_close(
            _delta(layer, "cat"), off * _delta(layer, "ours"), rtol=1e-5, atol=1e-6
        )


def test_a_non_lora_adapter_is_refused(tiny_base: Path) -> None:
    from make_run import load_base
    from peft import IA3Config, get_peft_model

    def cfg() -> Any:
        return IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])

    model = get_peft_model(load_base(tiny_base), cfg(), adapter_name="first")
    model.add_adapter("second", cfg())
    with pytest.raises(PlanError, match="adapter type IA3 is not supported"):
        merge_adapters(model, ["first", "second"])


def test_adapters_naming_the_base_differently_warn_not_refuse(tiny_base: Path) -> None:
    model = _model(tiny_base, {"first": PLAIN, "second": PLAIN}, seed=12)
    model.peft_config["second"].base_model_name_or_path = "org/the-same-model-on-the-hub"
    with pytest.warns(UserWarning, match="merge_adapters: .*base"):
        merge_adapters(model, ["first", "second"], name="m")
    assert _check_exact(model, "m", ["first", "second"], [0.5, 0.5]) == ALL_MODULES
