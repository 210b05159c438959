"""peft-geolora: GeoLoRA (geometric integration for low-rank adapters) as a PEFT tuner.

``import peft_geolora`` registers the tuner type "geolora" with PEFT, so that ``get_peft_model`` accepts a
:class:`GeoLoraConfig` and ``PeftModel.from_pretrained`` loads adapters of type "geolora".
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


MIN_PEFT_VERSION = "0.21.0"
# PEFT imports bitsandbytes where it is installed, and bitsandbytes' CPU backend logs a warning about an optional
# kernel package at import. A library's logger without a handler prints through logging's last resort; with this
# handler the import prints nothing, and an application that configures logging still receives the record.
logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())

try:
    _peft_version = version("peft")
except PackageNotFoundError as exc:  # pragma: no cover - peft is a dependency
    raise ImportError("peft_geolora needs `peft>=0.21.0`: pip install 'peft>=0.21.0,<0.22'") from exc
if Version(_peft_version) < Version(MIN_PEFT_VERSION):
    raise ImportError(
        f"peft_geolora needs peft >= {MIN_PEFT_VERSION} (it relies on the tuner state-dict classmethods added in "
        f"0.21), but peft {_peft_version} is installed. Upgrade with: pip install 'peft>=0.21.0,<0.22'"
    )

from .allocator import RankAllocator  # noqa: E402
from .callbacks import GeoLoraCallback  # noqa: E402
from .config import GeoLoraConfig  # noqa: E402
from .export import export_adapter_dir, export_to_lora, geolora_from_lora  # noqa: E402
from .layer import GeoLoraLayer, Linear  # noqa: E402
from .loading import DamagedAdapterError, check_adapter_dir, from_pretrained  # noqa: E402
from .loading import install as install_damage_checks  # noqa: E402
from .model import GeoLoraModel  # noqa: E402
from .model_card import install as install_model_card  # noqa: E402
from .parameter_count import install as install_parameter_count  # noqa: E402
from .registry import GEOLORA, register  # noqa: E402
from .stall import StallCallback  # noqa: E402
from .transformers_loading import install as install_transformers_loading  # noqa: E402


register(GeoLoraConfig, GeoLoraModel)
install_transformers_loading()
install_parameter_count()
install_model_card()
install_damage_checks()

__version__ = "0.3.0.dev0"
__all__ = [
    "GEOLORA",
    "DamagedAdapterError",
    "GeoLoraCallback",
    "GeoLoraConfig",
    "GeoLoraLayer",
    "GeoLoraModel",
    "Linear",
    "RankAllocator",
    "StallCallback",
    "check_adapter_dir",
    "export_adapter_dir",
    "export_to_lora",
    "from_pretrained",
    "geolora_from_lora",
]
