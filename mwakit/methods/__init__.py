"""Merge methods, registered by name.

A method is one small module: a pydantic ``Params`` model (unknown keys rejected), a docstring
with the formula, the space it works in and its reference, and one pure ``merge`` function over
a tensor group. Importing this package must stay torch-free so `mwakit validate` and `--help`
are fast: method modules import torch inside their functions only.
"""

from __future__ import annotations

from mwakit.methods.registry import MergeMethod, get_method, method_names, register

# Importing the method modules registers them; the order is the order `mwakit methods` lists.
from mwakit.methods import linear as _linear  # noqa: F401  isort: skip
from mwakit.methods import mwa as _mwa  # noqa: F401  isort: skip
from mwakit.methods import task_arithmetic as _task_arithmetic  # noqa: F401  isort: skip
from mwakit.methods import ties as _ties  # noqa: F401  isort: skip
from mwakit.methods import dare as _dare  # noqa: F401  isort: skip
from mwakit.methods import magnitude_prune as _magnitude_prune  # noqa: F401  isort: skip
from mwakit.methods import breadcrumbs as _breadcrumbs  # noqa: F401  isort: skip
from mwakit.methods import della as _della  # noqa: F401  isort: skip
from mwakit.methods import sce as _sce  # noqa: F401  isort: skip
from mwakit.methods import slerp as _slerp  # noqa: F401  isort: skip
from mwakit.methods import karcher as _karcher  # noqa: F401  isort: skip
from mwakit.methods import nuslerp as _nuslerp  # noqa: F401  isort: skip
from mwakit.methods import multislerp as _multislerp  # noqa: F401  isort: skip
from mwakit.methods import model_stock as _model_stock  # noqa: F401  isort: skip
from mwakit.methods import nearswap as _nearswap  # noqa: F401  isort: skip
from mwakit.methods import fisher as _fisher  # noqa: F401  isort: skip
from mwakit.methods import sparse as _sparse  # noqa: F401  isort: skip
from mwakit.methods import passthrough as _passthrough  # noqa: F401  isort: skip

__all__ = ["MergeMethod", "get_method", "method_names", "register"]
