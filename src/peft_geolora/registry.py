"""Registration of the "geolora" tuner type with PEFT, in memory and idempotent.

PEFT 0.21's ``register_peft_method`` only accepts names that are members of its closed ``PeftType`` enum, so the
member ``PeftType.GEOLORA`` is added in memory first (PEFT's files on disk are never touched). Both steps are
guarded so that importing or reloading ``peft_geolora`` twice is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to ``PeftType`` (a ``str`` enum) as a real member, or return the existing one."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(PeftType, name, member)  # before _member_map_: EnumType.__setattr__ refuses to rebind members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


GEOLORA: PeftType = _extend_peft_type("GEOLORA")
PREFIX = "geolora_"


def register(config_cls: type, model_cls: type) -> None:
    """Register the tuner with PEFT once; a second call (module reload) re-points the mappings at the new classes."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    if GEOLORA in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[GEOLORA] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[GEOLORA] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[GEOLORA] = PREFIX
        return
    register_peft_method(name="geolora", config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
