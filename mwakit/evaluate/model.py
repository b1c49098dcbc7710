"""The base model, loaded once, with candidate adapters swapped into it in place.

The first adapter wraps the base in a `PeftModel` built from that adapter's config, so PEFT's
own reading of ``r``, ``lora_alpha``, rsLoRA, ``rank_pattern`` and ``alpha_pattern`` gives each
layer its scaling. Later candidates with the same structure (config and tensor shapes) are
copied into the existing LoRA tensors: no reload, no new modules. A candidate with another
structure (a concat merge of more checkpoints has a larger rank) re-creates the adapter slot on
the same base weights, which are never read from disk again. A full-model candidate is loaded
into the base weights; the original weights are kept on the CPU to return to.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import PlanError, SourceError

if TYPE_CHECKING:
    import torch

    from mwakit.memory import MergedAdapter

#: adapter_config.json keys that do not change what the adapter computes.
_INERT = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}


def resolve_model_folder(ref: str | Path) -> Path:
    """A local model folder for a folder path or an ``hf://org/repo[@rev][/sub]`` reference.

    Raises:
        SourceError: The folder has no config.json.
        HubError: The download failed (or offline with nothing cached).
    """
    text = str(ref)
    if text.startswith("hf://"):
        from mwakit import hub

        try:
            parsed = hub.parse_hf_ref(text)
        except ValueError as err:
            raise SourceError(str(err), where=text, fix="write hf://org/repo[@rev]") from err
        folder, _ = hub.download(parsed)
    else:
        folder = Path(text)
    if not (folder / "config.json").is_file():
        raise SourceError(
            "no config.json: not a model folder",
            where=text,
            fix="pass the folder (or hf:// reference) of the base model the adapter was trained on",
        )
    return folder


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' progress bars and upstream deprecation chatter (library code)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*lora_bias.*")
            # The adapter config names the base it was trained from; the one loaded is ours.
            warnings.filterwarnings("ignore", message=r".*base_model_name_or_path. was renamed")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _structure(adapter: MergedAdapter) -> str:
    cfg = {k: v for k, v in adapter.adapter_config.items() if k not in _INERT}
    shapes = sorted((k, tuple(t.shape), str(t.dtype)) for k, t in adapter.tensors.items())
    return json.dumps([cfg, shapes], sort_keys=True, default=str)


class LoadedModel:
    """A causal LM loaded once, scoring the base, adapters swapped in place, or full merges.

    Args:
        folder: The local model folder.
        device: A torch device.
        dtype: The compute dtype (``float32``, ``bfloat16``, …).
    """

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.folder = folder
        self.device = device
        self.dtype = dtype
        try:
            with quiet():
                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise SourceError(
                f"could not load the model: {err}",
                where=str(folder),
                fix="pass a causal-LM folder saved with save_pretrained",
            ) from err
        loaded: Any = model
        self.base: Any = loaded.to(device).eval().requires_grad_(False)
        self.peft: Any = None  # the PeftModel around `base`, once an adapter was scored
        self._structure: str | None = None
        self._pristine: dict[str, torch.Tensor] | None = None  # base weights, after a full merge
        self.swaps = 0
        self.rebuilds = 0

    @property
    def config(self) -> Any:
        """The model's transformers config."""
        return self.base.config

    @contextlib.contextmanager
    def use(self, adapter: MergedAdapter | None) -> Iterator[Any]:
        """The model to run with ``adapter`` in place (None: the base model itself).

        Raises:
            PlanError: The adapter's tensors do not fit the base (other target modules or
                shapes than the model has).
        """
        import torch

        with torch.no_grad():
            if adapter is None:
                self._restore()
                if self.peft is None:
                    yield self.base
                else:
                    with self.peft.disable_adapter():
                        yield self.peft
            elif adapter.kind == "full":
                self._load_full(adapter)
                yield self.base if self.peft is None else self._without_peft()
            else:
                self._restore()
                self._swap(adapter)
                yield self.peft

    def _without_peft(self) -> Any:
        """Remove the adapter slot, giving back the base model exactly as loaded."""
        from peft.utils.other import ModulesToSaveWrapper

        # PEFT's unload keeps a modules_to_save module's *trained copy* in the base; put the
        # original module back first, so the base weights stay those read from disk.
        for name, m in list(self.peft.base_model.model.named_modules()):
            if isinstance(m, ModulesToSaveWrapper):
                parent_name, _, child = name.rpartition(".")
                parent = self.peft.base_model.model.get_submodule(parent_name)
                setattr(parent, child, m.original_module)
        self.base = self.peft.unload()  # drops the LoRA layers; their base layers stay
        self.peft, self._structure = None, None
        return self.base

    def _swap(self, adapter: MergedAdapter) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        structure = _structure(adapter)
        if structure != self._structure:
            if self.peft is not None:
                self._without_peft()
            with quiet():
                self.peft = get_peft_model(self.base, _lora_config(adapter.adapter_config))
            self.peft.to(self.device).eval().requires_grad_(False)
            self._structure = structure
            self.rebuilds += 1
        expected = set(_adapter_keys(self.peft))
        given = set(adapter.tensors)
        if expected != given:
            # A key the model has but the candidate lacks would keep a previous candidate's
            # values: refuse instead of scoring a blend.
            extra = sorted(given - expected)
            missing = sorted(expected - given)
            detail = f"e.g. {extra[0]} is not in the model" if extra else f"{missing[0]} missing"
            raise PlanError(
                f"the adapter's tensors do not fit the model ({detail})",
                where=str(self.folder),
                fix="evaluate the adapter with the base model it was trained on",
            )
        tensors = {k: v.to(self.device, self.dtype) for k, v in adapter.tensors.items()}
        try:
            set_peft_model_state_dict(self.peft, tensors)
        except RuntimeError as err:  # a shape mismatch against an existing module
            raise PlanError(
                f"the adapter's tensors do not fit the model: {str(err).splitlines()[0]}",
                where=str(self.folder),
                fix="evaluate the adapter with the base model it was trained on",
            ) from err
        self.swaps += 1

    def _load_full(self, adapter: MergedAdapter) -> None:
        model = self.base if self.peft is None else self._without_peft()
        state = model.state_dict()
        if self._pristine is None:
            self._pristine = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        unknown = sorted(set(adapter.tensors) - set(state))
        if unknown:
            raise PlanError(
                f"the merged model has tensors the base lacks, e.g. {unknown[0]}",
                where=str(self.folder),
                fix="evaluate with --base a model of the merged checkpoints' architecture",
            )
        for k, v in adapter.tensors.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise PlanError(
                    f"{k} is {tuple(v.shape)} in the merge, {tuple(state[k].shape)} in the base",
                    where=str(self.folder),
                    fix="evaluate with --base a model of the merged checkpoints' architecture",
                )
            state[k].copy_(v)  # tied weights share storage: one copy serves both names
        self.swaps += 1

    def _restore(self) -> None:
        if self._pristine is None:
            return
        if self.peft is not None:
            self._without_peft()
        state = self.base.state_dict()
        for k, v in self._pristine.items():
            state[k].copy_(v)
        self._pristine = None


def _adapter_keys(peft_model: Any) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(peft_model, save_embedding_layers=False))


def _lora_config(cfg: dict[str, Any]) -> Any:
    """A PEFT config from an adapter_config.json dict (keys this PEFT lacks are dropped)."""
    import dataclasses

    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kind = str(cfg.get("peft_type", "LORA"))
    mapping: dict[Any, Any] = dict(PEFT_TYPE_TO_CONFIG_MAPPING)
    cls = mapping.get(kind)
    if cls is None:
        raise PlanError(
            f"peft_type {kind} cannot be evaluated", where="adapter_config.json", fix="use LoRA"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in cfg.items() if k in names}
    kept["inference_mode"] = True
    config = PeftConfig.from_peft_type(**kept)
    return config
