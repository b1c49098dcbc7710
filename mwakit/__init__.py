"""mwakit: merge model checkpoints (PEFT/LoRA first) with Metrics-Weighted Averaging.

Python API::

    import mwakit
    recipe = mwakit.load_recipe("recipe.yaml")
    plan = mwakit.plan(recipe)          # headers only: weights, per-tensor plan, warnings
    result = mwakit.run(recipe)         # writes the merged adapter folder atomically
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_recipe", "parse_recipe", "plan", "run"]

if TYPE_CHECKING:
    from mwakit.api import plan, run
    from mwakit.recipe import load_recipe, parse_recipe


def __getattr__(name: str) -> Any:
    # Lazy so `import mwakit` (and `mwakit --help`) does not pay for pydantic models or torch.
    if name in ("plan", "run"):
        from mwakit import api

        return getattr(api, name)
    if name in ("load_recipe", "parse_recipe"):
        from mwakit import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'mwakit' has no attribute {name!r}")
