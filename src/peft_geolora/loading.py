"""Loading a GeoLoRA adapter with its files checked first.

Every load path checks a GeoLoRA adapter's files before any tensor reaches the model, so that a damaged download, a
save killed half-way, a poisoned tensor or a file that does not describe the adapter fails with a message that says
what happened (:func:`check_adapter_dir`):

* ``adapter_config.json`` parses and is a GeoLoRA config;
* the weights file's header parses and the file is as long as the header says (a truncated file is caught before any
  tensor is read);
* every tensor is finite, every factor and head tensor floating point;
* every adapted layer in the file has all of ``U``, ``S``, ``V`` and its rank, ``U``: (m, r), ``V``: (n, r),
  ``S``: (r, r) for its rank r, and the config's ``rank_pattern`` names exactly those layers with those ranks.

:func:`install` runs these checks inside PEFT's ``PeftModel.load_adapter`` (which ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and the Trainer's resume and ``load_best_model_at_end`` all call) and transformers'
``load_adapter``, and makes PEFT's safetensors reader name a file that does not parse. The model-dependent checks
(layers the model does not have, layers of the model the file lacks) run where the tensors meet the model
(``GeoLoraModel._remap_adapter_state_dict_for_load``, and after transformers' loader from its report).
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from torch import nn


CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"


class DamagedAdapterError(ValueError):
    """An adapter folder whose files are incomplete or corrupted."""


_GEOLORA_KEY = re.compile(r"^(?P<module>.*)\.geolora_(?P<part>U|S|V|rank)$")
_PEFT_PREFIX = "base_model.model."


def install() -> None:
    """Put the checks of this module on PEFT's and transformers' load paths, once (idempotent).

    * PEFT's safetensors reader raises :class:`DamagedAdapterError` naming a file that does not parse, for adapters
      of every type;
    * ``PeftModel.load_adapter`` and transformers' ``load_adapter`` run :func:`check_adapter_dir` on a GeoLoRA
      adapter's files first (other adapter types load untouched); transformers' loader then refuses GeoLoRA keys it
      reports missing or unexpected.
    """
    from peft.utils import save_and_load
    from safetensors import SafetensorError

    original = save_and_load.safe_load_file
    if getattr(original, "_geolora_wrapped", False):
        return

    def safe_load_file(filename: Union[str, os.PathLike], device: Any = "cpu") -> dict:
        try:
            return original(filename, device=device)
        except SafetensorError as exc:
            raise DamagedAdapterError(
                f"{filename} is damaged or truncated ({exc}). The save or download did not complete; save or "
                "download the adapter again."
            ) from exc

    safe_load_file._geolora_wrapped = True
    save_and_load.safe_load_file = safe_load_file
    _wrap_peft_load_adapter()
    _wrap_transformers_load_adapter()


def _geolora_folder(model_id: Union[str, os.PathLike], kwargs: dict[str, Any]) -> Optional[Path]:
    """The local folder of a GeoLoRA adapter a loader was given (a folder, or a Hub repository resolved through the
    Hub's cache as PEFT resolves it); None for another adapter type or where it cannot be resolved (the loader then
    reports that itself)."""
    subfolder = kwargs.get("subfolder")
    if Path(model_id).is_dir():
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        try:
            config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return folder if (folder / CONFIG_NAME).is_file() else None  # unreadable: check_adapter_dir says so
        return folder if config.get("peft_type") == "GEOLORA" else None
    try:
        from huggingface_hub import hf_hub_download

        options = {k: kwargs[k] for k in ("cache_dir", "token", "force_download", "local_files_only") if k in kwargs}
        config_file = hf_hub_download(
            str(model_id), CONFIG_NAME, revision=kwargs.get("revision"), subfolder=subfolder or None, **options
        )
        if json.loads(Path(config_file).read_text(encoding="utf-8")).get("peft_type") != "GEOLORA":
            return None
        return _resolve_from_hub(str(model_id), kwargs.get("revision"), subfolder, kwargs)
    except Exception:  # noqa: BLE001 - not resolvable here: the loader resolves (and reports) it itself
        return None


def _warn_unknown_fields(folder: Path) -> None:
    """Where a loader does not read the config (``load_adapter`` into an adapter that exists), say which of its fields
    this version does not know, as PEFT says where it reads one."""
    from .config import GeoLoraConfig

    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    unknown = sorted(set(config) - set(GeoLoraConfig.__dataclass_fields__))
    if unknown:
        warnings.warn(
            f"{folder / CONFIG_NAME} has fields this version of peft-geolora does not know: {unknown}. It was "
            "written by a newer version; the tensors load, these settings are ignored. Upgrade peft-geolora to use "
            "them.",
            stacklevel=4,
        )


def _wrap_peft_load_adapter() -> None:
    original = PeftModel.load_adapter

    def load_adapter(self: PeftModel, model_id: Union[str, os.PathLike], adapter_name: str, *args: Any, **kwargs: Any):
        folder = _geolora_folder(model_id, kwargs)
        if folder is not None:
            check_adapter_dir(folder)
            if adapter_name in self.peft_config:
                _warn_unknown_fields(folder)
        return original(self, model_id, adapter_name, *args, **kwargs)

    load_adapter.__doc__ = original.__doc__
    PeftModel.load_adapter = load_adapter


def _wrap_transformers_load_adapter() -> None:
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers without PEFT integration
        return
    original = PeftAdapterMixin.load_adapter

    def load_adapter(self: nn.Module, peft_model_id: Optional[str] = None, *args: Any, **kwargs: Any):
        folder = None if peft_model_id is None else _geolora_folder(peft_model_id, kwargs.get("adapter_kwargs") or {})
        if folder is not None:
            check_adapter_dir(folder)
        info = original(self, peft_model_id, *args, **kwargs)
        if folder is not None and info is not None:
            missing = sorted(k for k in getattr(info, "missing_keys", ()) if ".geolora_" in k)
            unexpected = sorted(k for k in getattr(info, "unexpected_keys", ()) if ".geolora_" in k)
            if missing or unexpected:
                raise ValueError(
                    f"The GeoLoRA adapter in {folder} does not fit this model: "
                    + (f"the model's layers {missing[:4]} have no tensors in the file" if missing else "")
                    + ("; " if missing and unexpected else "")
                    + (
                        f"the file has {unexpected[:4]} for which the model has no such GeoLoRA layer"
                        if unexpected
                        else ""
                    )
                    + ". It was saved for another base model or the file is damaged."
                )
        return info

    load_adapter.__doc__ = original.__doc__
    PeftAdapterMixin.load_adapter = load_adapter


def check_adapter_dir(path: Union[str, os.PathLike]) -> None:
    """Raise :class:`DamagedAdapterError` unless ``path`` holds a readable, complete GeoLoRA adapter."""
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise DamagedAdapterError(f"`{folder}` has no {CONFIG_NAME}: it is not a PEFT adapter folder.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedAdapterError(
            f"{config_file} is not valid JSON ({exc}): the save was interrupted or the file is damaged. Save the "
            "adapter again, or download it again."
        ) from exc
    if config.get("peft_type") != "GEOLORA":
        raise DamagedAdapterError(
            f"{config_file} describes a {config.get('peft_type')} adapter; peft_geolora.from_pretrained loads GeoLoRA "
            "adapters (use peft.PeftModel.from_pretrained for other types)."
        )
    weights = folder / SAFETENSORS_NAME
    if weights.is_file():
        _check_safetensors(weights)
        from safetensors.torch import load_file

        check_contents(load_file(weights), config.get("rank_pattern"), str(weights))
    elif not (folder / "adapter_model.bin").is_file():
        raise DamagedAdapterError(f"`{folder}` has {CONFIG_NAME} but no weights file ({SAFETENSORS_NAME}).")


def check_contents(tensors: dict[str, torch.Tensor], rank_pattern: Optional[dict[str, int]], where: str) -> None:
    """A GeoLoRA weights file's tensors, checked without the model: every floating-point tensor finite, the factors
    floating point; every layer with all of ``U`` (m, r), ``S`` (r, r), ``V`` (n, r) and its rank r; and
    ``rank_pattern`` (the config's record of the ranks, where present) naming exactly those layers and ranks."""
    from .model import check_finite_float

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _GEOLORA_KEY.match(key)
        if match is None:
            if tensor.is_floating_point():
                check_finite_float(key, tensor)
            continue
        layers.setdefault(match["module"], {})[match["part"]] = tensor
    for module, parts in layers.items():
        absent = [p for p in ("U", "S", "V", "rank") if p not in parts]
        if absent:
            raise ValueError(
                f"{where} lacks {', '.join(f'`{module}.geolora_{p}`' for p in absent)}: the layer's adapter is "
                "incomplete, so it would load as a different model. The file is damaged or was edited; save or "
                "download the adapter again."
            )
        for p in "USV":
            check_finite_float(f"{module}.geolora_{p}", parts[p])
        rank = int(parts["rank"])
        U, S, V = parts["U"], parts["S"], parts["V"]
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != rank or V.shape[1] != rank or tuple(S.shape) != (rank, rank):
            raise ValueError(
                f"{where}: the factors of `{module}` have shapes U {tuple(U.shape)}, S {tuple(S.shape)}, V "
                f"{tuple(V.shape)}, but its rank buffer says {rank}. The file is damaged or was not written by "
                "peft_geolora; save the adapter again."
            )
    if rank_pattern is None:
        return
    in_file = {m.removeprefix(_PEFT_PREFIX): int(p["rank"]) for m, p in layers.items()}
    for name, rank in sorted(rank_pattern.items()):
        if name not in in_file:
            raise ValueError(
                f"`adapter_config.json` records rank {rank} for `{name}` but {where} lacks that layer's tensors: the "
                "config and the weights come from different saves, or the file is damaged. Save the adapter again."
            )
        if in_file[name] != rank:
            raise ValueError(
                f"`adapter_config.json` records rank {rank} for `{name}` but the weights file holds rank "
                f"{in_file[name]}: the config and the weights come from different saves. Save the adapter again, or "
                "restore both files from the same save."
            )
    extra = sorted(set(in_file) - set(rank_pattern))
    if extra:
        raise ValueError(
            f"{where} holds the adapter of `{extra[0]}`, a layer `adapter_config.json` does not record"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: the config and the weights come from "
            "different saves. Save the adapter again."
        )


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds exactly the bytes the header describes."""
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            problem = f"it is {size} bytes long, shorter than a safetensors header"
        else:
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                problem = f"its header claims {header_len} bytes but the file has {size - 8} after the length field"
            else:
                try:
                    header = json.loads(f.read(header_len))
                    end = max(
                        (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0
                    )
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
                    header, end = None, None
                    problem = f"its header does not parse ({exc})"
                if header is not None and 8 + header_len + end != size:
                    problem = f"its tensors need {8 + header_len + end} bytes but the file has {size}"
    if problem:
        raise DamagedAdapterError(
            f"{path} is damaged or truncated: {problem}. The save or download did not complete; save or download "
            "the adapter again."
        )


def from_pretrained(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained(model, path, ...)`` after :func:`check_adapter_dir` on the files it will read.

    ``path`` is a local folder or a Hub repository id (with ``revision`` and ``subfolder`` as in PEFT). A repository's
    files are resolved by the Hub client first (from its cache, or downloaded), then checked where they lie, so a
    truncated or corrupted download raises :class:`DamagedAdapterError` naming the repository and the file; PEFT
    then loads exactly those files.
    """
    if Path(path).is_dir():
        folder = Path(path) / subfolder if subfolder else Path(path)
        check_adapter_dir(folder)
        return PeftModel.from_pretrained(model, str(folder), revision=revision, **kwargs)
    folder = _resolve_from_hub(str(path), revision, subfolder, kwargs)
    try:
        check_adapter_dir(folder)
    except DamagedAdapterError as exc:
        where = f"`{path}`" + (f" (revision `{revision}`)" if revision else "")
        raise DamagedAdapterError(
            f"The adapter downloaded from the Hub repository {where} is damaged: {exc} Delete the cached files "
            f"(`huggingface-cli delete-cache`, or the folder {folder}) and download them again."
        ) from exc
    return PeftModel.from_pretrained(model, str(folder), **kwargs)


def _resolve_from_hub(repo_id: str, revision: Optional[str], subfolder: Optional[str], kwargs: dict[str, Any]) -> Path:
    """The local folder (in the Hub cache) holding the adapter's config and weights, downloading them if needed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    options = {k: kwargs[k] for k in ("cache_dir", "token", "force_download", "local_files_only") if k in kwargs}
    options.update(revision=revision, subfolder=subfolder or None)
    config_file = Path(hf_hub_download(repo_id, CONFIG_NAME, **options))
    for weights in (SAFETENSORS_NAME, "adapter_model.bin"):
        try:
            hf_hub_download(repo_id, weights, **options)
            break
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
    return config_file.parent
