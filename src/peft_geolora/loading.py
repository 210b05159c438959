"""Loading a GeoLoRA adapter with its files checked first.

``peft_geolora.from_pretrained(base_model, path)`` is ``PeftModel.from_pretrained`` after three checks on a local
adapter folder, so that a damaged download or a save killed half-way fails with a message that says what happened
instead of an error from deep inside a parser: ``adapter_config.json`` parses and is a GeoLoRA config; the weights
file's header parses and the file is as long as the header says (a truncated file is caught before any tensor is
read). The loader itself then checks every factor against its recorded rank (see ``GeoLoraModel``).

:func:`install` makes PEFT's own loader (``PeftModel.from_pretrained``, ``load_adapter``, ``AutoPeftModel*``) say the
same of a weights file that does not parse: safetensors' bare ``SafetensorError`` names no file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Optional, Union

from peft import PeftModel
from torch import nn


CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"


class DamagedAdapterError(ValueError):
    """An adapter folder whose files are incomplete or corrupted."""


def install() -> None:
    """Wrap the safetensors reader of PEFT's ``load_peft_weights`` once (idempotent): a file that does not parse
    raises :class:`DamagedAdapterError` naming it, for adapters of every type; intact files load as before."""
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
    elif not (folder / "adapter_model.bin").is_file():
        raise DamagedAdapterError(f"`{folder}` has {CONFIG_NAME} but no weights file ({SAFETENSORS_NAME}).")


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
