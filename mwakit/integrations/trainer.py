"""`MergeCallback`: merge a run's checkpoints when `transformers.Trainer` finishes training.

``Trainer(..., callbacks=[MergeCallback(recipe="merge.yaml")])`` (or keyword arguments such as
``MergeCallback(method="mwa", metric="eval_loss", penalty=2, last=5)``) merges the checkpoints the
Trainer saved under ``args.output_dir`` at ``on_train_end``, in the main process only, with
``mwakit.run``: the output folder is written atomically and equals what ``mwakit run`` writes
for the same recipe. TRL's trainers (``SFTTrainer``, ``DPOTrainer``, …) subclass ``Trainer``
and call the same callback events, so the callback works with them unchanged.

The recipe is checked when the callback is built and the Trainer's arguments when the Trainer
is (``on_init_end``), so a wrong recipe or a run that saves nothing fails before training, not
after hours of it.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from mwakit.errors import MwakitError, UsageError
from mwakit.recipe import Recipe, parse_recipe

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from mwakit.api import RunResult

__all__ = ["MergeCallback", "eval_rows"]

logger = logging.getLogger("mwakit.integrations")

#: The output folder when neither the recipe nor ``output_dir=`` names one.
DEFAULT_OUTPUT = "merged"
#: Where a tune writes the recipe it chose, inside ``args.output_dir``.
TUNED_RECIPE = "mwakit-tuned.yaml"
#: The Trainer's eval rows a tune scored on, beside the tuned recipe.
TUNED_DATA = "mwakit-tune-eval.jsonl"
_RUN_PLACEHOLDER = "<Trainer output_dir>"
_TEXT_KEYS = ("text", "prompt", "completion", "messages", "choices", "label")


def _value(v: Any) -> str:
    """An enum's value (``IntervalStrategy.NO`` → ``no``), or the string itself."""
    return str(getattr(v, "value", v))


def _eval_strategy(args: Any) -> str:
    # `evaluation_strategy` is the name before transformers 4.41.
    return _value(getattr(args, "eval_strategy", getattr(args, "evaluation_strategy", "no")))


def _read_recipe(recipe: str | Path | Mapping[str, Any] | Recipe) -> tuple[dict[str, Any], str]:
    """The recipe as plain data (to be completed by the callback) and its name for messages."""
    if isinstance(recipe, Recipe):
        return recipe.to_yaml_dict(), recipe.source or "recipe"
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe)), "recipe"
    from mwakit.errors import Problem, RecipeError
    from mwakit.recipe import _yaml

    path = Path(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise RecipeError(
            [Problem("", f"cannot read recipe: {why}", "check the recipe's path")],
            source=str(path),
        ) from err
    data = _yaml(text, str(path))
    if not isinstance(data, dict):
        parse_recipe(data, source=str(path))  # raises the "not a mapping" problem
    return data, str(path)


class MergeCallback(TrainerCallback):
    """Merge the run's saved checkpoints at the end of training.

    Args:
        recipe: A recipe file, a recipe mapping or a `Recipe`. Its ``select:`` (``last``,
            ``every``, ``steps``) picks among the run's checkpoints; ``select.run`` is always
            the Trainer's ``args.output_dir``. It may omit ``output:``. A recipe that lists
            ``checkpoints:`` is refused (the callback merges the run's own).
        method: The merge method (default: the recipe's, else ``mwa``).
        metric: MWA's metric (``loss``, ``eval_loss``, any logged key). With another method
            that takes weights, MWA weights come through ``weighting: {mwa: ...}``.
        penalty: MWA's penalty (0 = uniform, larger favours the best checkpoint).
        last: Merge only the last ``last`` checkpoints (``select.last``).
        output_dir: The merged adapter's folder (default: the recipe's ``output.path``, else
            ``<args.output_dir>/merged``).
        params: Other method params, merged over the recipe's.
        lora_space: ``factors`` or ``delta``.
        delta_rank: With ``delta``: ``concat``, ``full`` or a rank.
        loss_window: What each checkpoint's ``loss`` averages: ``since_save`` (the recipe
            default: the losses logged since the previous save) or the last n logged ones.
        overwrite: Replace an existing output folder.
        tune: Tune the merge on the Trainer's eval data before writing it: True, or a mapping
            of keyword arguments for `mwakit.tune.tune` (``searches``, ``budget``, ``metric``,
            ``base``, …). Needs `mwakit.tune`; refused here when it is missing.
        tune_data: A JSONL file to tune on instead of the Trainer's ``eval_dataset``.

    Attributes:
        result: The `mwakit.api.RunResult` of the merge, once training has ended (None before,
            and in processes other than the main one).

    Raises:
        RecipeError: The recipe (with the keyword arguments applied) is invalid.
        UsageError: ``checkpoints:`` in the recipe, MWA keywords with a method that computes
            its own weights, or ``tune=`` without `mwakit.tune`.
    """

    def __init__(
        self,
        recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
        *,
        method: str | None = None,
        metric: str | None = None,
        penalty: float | None = None,
        last: int | None = None,
        output_dir: str | Path | None = None,
        params: Mapping[str, Any] | None = None,
        lora_space: str | None = None,
        delta_rank: str | int | None = None,
        loss_window: int | str | None = None,
        overwrite: bool | None = None,
        tune: bool | Mapping[str, Any] | None = None,
        tune_data: str | Path | None = None,
    ) -> None:
        data, self._source = ({}, "MergeCallback") if recipe is None else _read_recipe(recipe)
        if data.get("checkpoints") is not None:
            raise UsageError(
                "the recipe lists checkpoints:, but the callback merges the run's own",
                where=self._source,
                fix="replace checkpoints: with select: {last: N} (select.run is the Trainer's "
                "output_dir), or run the recipe with `mwakit run` instead",
            )
        if method is not None:
            data["method"] = method
        data["params"] = {**(data.get("params") or {}), **dict(params or {})}
        mwa = {k: v for k, v in (("metric", metric), ("penalty", penalty)) if v is not None}
        if mwa:
            self._apply_mwa(data, mwa)
        select = dict(data.get("select") or {})
        if last is not None:
            select["last"] = last
        self._recipe_run = select.get("run")
        select["run"] = _RUN_PLACEHOLDER
        data["select"] = select
        for key, value in (
            ("lora_space", lora_space),
            ("delta_rank", delta_rank),
            ("loss_window", loss_window),
        ):
            if value is not None:
                data[key] = value
        out = data.get("output")
        out = dict(out) if isinstance(out, Mapping) else {"path": out} if out else {}
        if output_dir is not None:
            out["path"] = str(output_dir)
        if overwrite is not None:
            out["overwrite"] = overwrite
        self._output_given = "path" in out
        out.setdefault("path", f"{_RUN_PLACEHOLDER}/{DEFAULT_OUTPUT}")
        data["output"] = out
        # Checked now, with the run folder still a placeholder: a bad recipe fails before any
        # training, not after it.
        parse_recipe(data, source=self._source)
        self._data = data
        self._tune: dict[str, Any] | None = (
            None if tune is None or tune is False else {} if tune is True else dict(tune)
        )
        self._tune_data = Path(tune_data) if tune_data is not None else None
        if self._tune is not None:
            try:
                importlib.import_module("mwakit.tune")
            except ImportError as err:
                raise UsageError(
                    "tune is not available: this mwakit has no mwakit.tune",
                    where="MergeCallback(tune=...)",
                    fix="install a mwakit that has `mwakit tune`, or drop tune= (the merge "
                    "then uses the recipe as it is)",
                ) from err
        self.result: RunResult | None = None

    @staticmethod
    def _apply_mwa(data: dict[str, Any], mwa: dict[str, Any]) -> None:
        from mwakit.methods import get_method

        name = data.get("method", "mwa")
        if name == "mwa":
            data["params"].update(mwa)
            return
        try:
            takes_weights = get_method(name).uses_weights
        except KeyError:
            return  # the recipe check names the unknown method
        if not takes_weights:
            raise UsageError(
                f"method {name} computes its own weights, so {' and '.join(mwa)} would be ignored",
                where="MergeCallback",
                fix="drop metric=/penalty=, or use a method that takes weights (linear, ties, …)",
            )
        weighting = dict(data.get("weighting") or {})
        weighting["mwa"] = {**(weighting.get("mwa") or {}), **mwa}
        data["weighting"] = weighting

    def recipe_for(self, run_dir: str | Path) -> Recipe:
        """The recipe the callback runs for a Trainer ``output_dir``.

        Args:
            run_dir: The folder holding the run's ``checkpoint-<step>/`` folders.

        Returns:
            The validated recipe, with ``select.run`` set to ``run_dir``.
        """
        data = copy.deepcopy(self._data)
        data["select"]["run"] = str(run_dir)
        if not self._output_given:
            data["output"]["path"] = str(Path(run_dir) / DEFAULT_OUTPUT)
        return parse_recipe(data, source=self._source)

    @property
    def last(self) -> int | None:
        """How many trailing checkpoints the merge keeps (None: all)."""
        value = self._data["select"].get("last")
        return int(value) if value is not None else None

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Check the Trainer's arguments against the recipe, before any training step.

        Raises:
            UsageError: The Trainer saves no checkpoints, or a tune has no data to tune on.
            OutputError: The output folder exists (and ``overwrite`` is off) or cannot be
                written.
        """
        if _value(args.save_strategy) == "no":
            raise UsageError(
                "the Trainer saves no checkpoints (save_strategy='no'), so there is nothing to "
                "merge",
                where="MergeCallback",
                fix="set save_strategy='steps' with save_steps (or 'epoch') in TrainingArguments",
            )
        run_dir = Path(args.output_dir or "trainer_output")
        if isinstance(self._recipe_run, str) and Path(self._recipe_run) != run_dir:
            warnings.warn(
                f"MergeCallback: the recipe's select.run {self._recipe_run} is not the Trainer's "
                f"output_dir {run_dir}; the callback merges the checkpoints of {run_dir}",
                UserWarning,
                stacklevel=2,
            )
        self._check_output(run_dir)
        limit, last = args.save_total_limit, self.last
        if limit is not None and last is not None and limit < last:
            warnings.warn(
                f"MergeCallback: save_total_limit={limit} keeps only {limit} checkpoints, fewer "
                f"than last={last}: the merge will average {limit}. Raise save_total_limit to "
                f"{last} or more (or lower last).",
                UserWarning,
                stacklevel=2,
            )
        metric = self._metric()
        if metric is not None and metric.startswith("eval_") and _eval_strategy(args) == "no":
            warnings.warn(
                f"MergeCallback: the merge weighs by {metric}, but eval_strategy='no' logs no "
                "evaluation, so the checkpoints will lack it. Set eval_strategy to the "
                "save_strategy (with an eval_dataset).",
                UserWarning,
                stacklevel=2,
            )
        if self._tune is not None and self._tune_data is None and _eval_strategy(args) == "no":
            raise UsageError(
                "tune= scores merges on the Trainer's eval data, but eval_strategy='no' never "
                "evaluates",
                where="MergeCallback(tune=...)",
                fix="give the Trainer an eval_dataset and eval_strategy='steps', or pass "
                "tune_data=FILE.jsonl",
            )

    def _check_output(self, run_dir: Path) -> None:
        """Refuse now an output folder the merge could not write after training."""
        from mwakit.errors import OutputError
        from mwakit.io.atomic import check_target

        out = self.recipe_for(run_dir).output
        try:
            check_target(Path(out.path), out.overwrite)
        except OutputError as err:
            if not Path(out.path).is_dir() or out.overwrite:
                raise
            raise OutputError(
                err.what,
                where=err.where,
                fix="pass MergeCallback(overwrite=True) to replace it, or another output_dir",
            ) from err

    def _metric(self) -> str | None:
        d = self._data
        if d.get("method", "mwa") == "mwa":
            return str(d["params"].get("metric", "loss"))
        mwa = (d.get("weighting") or {}).get("mwa")
        return str(mwa.get("metric", "loss")) if isinstance(mwa, Mapping) else None

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Merge the saved checkpoints (main process only) and write the merged adapter.

        Raises:
            MwakitError: What ``mwakit run`` of the same recipe would raise; the checkpoints
                stay, so the merge can be redone with `recipe_for` and ``mwakit.run``.
        """
        if not state.is_world_process_zero:
            return
        import mwakit

        run_dir = Path(args.output_dir or "trainer_output")  # the Trainer's own default
        recipe = self.recipe_for(run_dir)
        saved = [
            int(p.name.removeprefix("checkpoint-"))
            for p in run_dir.glob("checkpoint-*")
            if p.name.removeprefix("checkpoint-").isdigit()
        ]
        # Recent Trainers save the last step too; older ones (and save_strategy="epoch" runs
        # cut short by max_steps) may not, and those steps then miss the merge silently.
        if saved and max(saved) < state.global_step:
            logger.warning(
                "MergeCallback: training ran to step %d but the last checkpoint is step %d; the "
                "steps after it are not in the merge (save at the last step to include them)",
                state.global_step,
                max(saved),
            )
        if self._tune is not None:
            recipe = self._tuned(recipe, run_dir, kwargs)
        self.result = mwakit.run(recipe)
        logger.info(
            "MergeCallback: merged %d checkpoints into %s",
            len(self.result.plan.checkpoints),
            self.result.path,
        )

    def _tuned(self, recipe: Recipe, run_dir: Path, events: dict[str, Any]) -> Recipe:
        """Tune ``recipe`` on the eval data and return the recipe the tune chose.

        The eval rows are kept beside the chosen recipe (`TUNED_DATA`), since its ``tuning:``
        record names the file it was tuned on.
        """
        from mwakit.recipe import load_recipe
        from mwakit.tune import tune

        assert self._tune is not None
        options = dict(self._tune)
        options.setdefault("out", run_dir / TUNED_RECIPE)
        with tempfile.TemporaryDirectory(prefix="mwakit-tune-") as tmp:
            data = self._tune_data
            if data is None:
                loader = events.get("eval_dataloader")
                dataset = getattr(loader, "dataset", None)
                if dataset is None:
                    raise UsageError(
                        "tune= found no eval data: the Trainer never evaluated",
                        where="MergeCallback(tune=...)",
                        fix="give the Trainer an eval_dataset with eval_strategy='steps', or "
                        "pass tune_data=FILE.jsonl",
                    )
                rows = eval_rows(dataset, events.get("processing_class"))
                data = run_dir / TUNED_DATA
                part = Path(tmp) / TUNED_DATA
                part.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
                shutil.move(part, data)  # complete or absent, never half-written
            if "tokenizer" not in options:
                found = _tokenizer_folder(run_dir, events.get("processing_class"), Path(tmp))
                if found is not None:
                    options["tokenizer"] = found
            tune(recipe, data=data, **options)
        chosen = load_recipe(options["out"])
        # The tune chose how to merge; where to write stays the callback's.
        return chosen.model_copy(update={"output": recipe.output})


def _tokenizer_folder(run_dir: Path, tokenizer: Any, tmp: Path) -> Path | None:
    """The tokenizer the run trained with (which the base folder may lack): the one the Trainer
    saved in the last checkpoint, else the Trainer's own saved into ``tmp``, else None."""
    from mwakit.recipe import Select
    from mwakit.sources import discover

    try:
        last = discover(Select(run=str(run_dir)))[-1]
    except MwakitError:
        last = None
    if last is not None and (last / "tokenizer_config.json").is_file():
        return last
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        return tmp / "tokenizer"
    return None


def _plain(v: Any) -> Any:
    """A tensor or array as a list; anything else as it is."""
    return v.tolist() if hasattr(v, "tolist") else v


def eval_rows(dataset: Iterable[Mapping[str, Any]], tokenizer: Any = None) -> list[dict[str, Any]]:
    """The Trainer's eval dataset as rows for `mwakit.evaluate` / `mwakit.tune` (JSONL-ready).

    Rows that already hold text in a TRL format (``text``, ``prompt``/``completion``,
    ``messages``, ``prompt``/``choices``/``label``) keep those fields. Tokenised rows
    (``input_ids``, as the Trainer sees them) are decoded with the Trainer's tokenizer: padding
    (``attention_mask`` 0) is dropped, and when the loss skips a prefix (TRL's
    ``completion_mask`` 0, or ``labels`` -100) that prefix becomes the ``prompt`` and the rest the
    ``completion`` (loss on the completion only, as in training); otherwise the row is
    ``{"text": ...}``.

    Args:
        dataset: The rows (a `datasets.Dataset`, a torch dataset, a list of dicts).
        tokenizer: The Trainer's ``processing_class``; needed for tokenised rows.

    Returns:
        One dict per row.

    Raises:
        UsageError: A row with neither text fields nor ``input_ids``, or tokenised rows without
            a tokenizer.
    """
    rows: list[dict[str, Any]] = []
    items: Iterable[Any] = dataset
    if isinstance(dataset, Sized) and hasattr(dataset, "__getitem__"):
        # A torch map-style dataset need not be iterable: index it.
        items = (dataset[i] for i in range(len(dataset)))
    for i, ex in enumerate(items):
        text = {k: _plain(ex[k]) for k in _TEXT_KEYS if k in ex}
        if text and ("text" in text or "messages" in text or "prompt" in text):
            rows.append(text)
            continue
        if "input_ids" not in ex:
            raise UsageError(
                f"eval row {i} has neither text fields ({', '.join(_TEXT_KEYS)}) nor input_ids",
                where="MergeCallback(tune=...)",
                fix="pass tune_data=FILE.jsonl with rows the evaluator reads",
            )
        if tokenizer is None:
            raise UsageError(
                "the eval dataset is tokenised and the Trainer has no tokenizer to decode it",
                where="MergeCallback(tune=...)",
                fix="give the Trainer processing_class=tokenizer, or pass tune_data=FILE.jsonl",
            )
        ids = list(_plain(ex["input_ids"]))
        mask = _plain(ex.get("attention_mask"))
        keep = [j for j in range(len(ids)) if mask is None or mask[j]]
        ids = [ids[j] for j in keep]
        # What the loss skips: TRL's completion_mask (0 on the prompt), else labels of -100.
        skipped: list[bool] | None = None
        if ex.get("completion_mask") is not None:
            skipped = [not _plain(ex["completion_mask"])[j] for j in keep]
        elif ex.get("labels") is not None:
            skipped = [_plain(ex["labels"])[j] == -100 for j in keep]
        prefix = 0
        while skipped is not None and prefix < len(skipped) and skipped[prefix]:
            prefix += 1
        decode = tokenizer.decode
        if 0 < prefix < len(ids):
            rows.append(
                {
                    "prompt": decode(ids[:prefix], skip_special_tokens=True),
                    "completion": decode(ids[prefix:], skip_special_tokens=True),
                }
            )
        else:
            rows.append({"text": decode(ids, skip_special_tokens=True)})
    return rows
