"""Loading a GeoLoRA adapter with its files checked first.

``peft_geolora.from_pretrained(base_model, path)`` is ``PeftModel.from_pretrained`` after three checks on a local
adapter folder, so that a damaged download or a save killed half-way fails with a message that says what happened
instead of an error from deep inside a parser: ``adapter_config.json`` parses and is a GeoLoRA config; the weights
file's header parses and the file is as long as the header says (a truncated file is caught before any tensor is
read). The loader itself then checks every factor against its recorded rank (see ``GeoLoraModel``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Union

from peft import PeftModel
from torch import nn


CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"


class DamagedAdapterError(ValueError):
    """An adapter folder whose files are incomplete or corrupted."""


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


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike], **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, path, **kwargs)`` after :func:`check_adapter_dir` on a local folder.

    A Hub repository id (not a local folder) is passed straight to PEFT.
    """
    if Path(path).is_dir():
        check_adapter_dir(path)
    return PeftModel.from_pretrained(model, path, **kwargs)
