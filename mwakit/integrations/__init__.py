"""Where users train: a `transformers.Trainer` callback that merges the run when it ends.

::

    from mwakit.integrations import MergeCallback

    trainer = Trainer(..., callbacks=[MergeCallback(method="mwa", metric="eval_loss", last=5)])
    trainer.train()  # then <output_dir>/merged holds the merged adapter

Importing this package imports transformers (the callback subclasses ``TrainerCallback``).
"""

from __future__ import annotations

from mwakit.integrations.trainer import MergeCallback, eval_rows

__all__ = ["MergeCallback", "eval_rows"]
