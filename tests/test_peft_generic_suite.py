"""PEFT 0.21's own generic test suite, run against ``GeoLoraConfig``.

The test classes of PEFT's ``test_custom_models.py`` are re-parametrized with GeoLoRA rows that mirror LoRA's
rows for every test model with ``nn.Linear``, ``nn.Conv2d`` (groups 1) or transformers ``Conv1D`` layers. Tests of other methods, and
tests that download from the Hub, are not collected (docs/design.md, "Tests", lists the skips).
"""

from __future__ import annotations

import sys
import types

import pytest

from peft_geolora import GeoLoraConfig

from .peft_suite import ensure_peft_tests


sys.path.insert(0, str(ensure_peft_tests()))
from peft_tests import test_custom_models as _tcm


GEO_CASES = [
    ("Vanilla MLP 1 GeoLoRA", "MLP", GeoLoraConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GeoLoRA", "MLP", GeoLoraConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GeoLoRA", "MLP", GeoLoraConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GeoLoRA", "MLP", GeoLoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GeoLoRA", "MLP", GeoLoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 GeoLoRA",
        "MLP",
        GeoLoraConfig,
        {"target_modules": ["lin0"], "lora_alpha": 0.5, "lora_dropout": 0.1},
    ),
    (
        "Vanilla MLP 7 GeoLoRA small ranks",
        "MLP",
        GeoLoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "max_rank": 4, "tau": 0.2, "lora_alpha": 1},
    ),
    ("Vanilla MLP 8 GeoLoRA regex", "MLP", GeoLoraConfig, {"target_modules": ".*lin[01]"}),
    (
        "Vanilla MLP 9 GeoLoRA exclude",
        "MLP",
        GeoLoraConfig,
        {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"]},
    ),
    (
        "Vanilla MLP 10 GeoLoRA budget cycle",
        "MLP",
        GeoLoraConfig,
        {"target_modules": ["lin0", "lin1"], "budget": 6, "cycle_length": 3},
    ),
    ("MLP LayerNorm GeoLoRA", "MLP_LayerNorm", GeoLoraConfig, {"target_modules": ["lin0"]}),
    ("MLP2 GeoLoRA", "MLP2", GeoLoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Embedding + transformers Conv1D 1 GeoLoRA", "EmbConv1D", GeoLoraConfig, {"target_modules": ["conv1d"]}),
    (
        "Embedding + transformers Conv1D 2 GeoLoRA",
        "EmbConv1D",
        GeoLoraConfig,
        {"target_modules": ["conv1d", "lin0"], "modules_to_save": ["emb"]},
    ),
    ("Conv2d model, Linear GeoLoRA", "Conv2d", GeoLoraConfig, {"target_modules": ["lin0"]}),
    ("Conv2d 1 GeoLoRA", "Conv2d", GeoLoraConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 GeoLoRA", "Conv2d", GeoLoraConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1x1 GeoLoRA", "Conv2d1x1", GeoLoraConfig, {"target_modules": ["conv2d"]}),
    ("MHA model, Linear GeoLoRA", "MHA", GeoLoraConfig, {"target_modules": ["lin0"]}),
]

GEO_MULTI_ADAPTER_CASES = [
    (
        "GeoLoRA Same",
        "geolora",
        GeoLoraConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "GeoLoRA Different",
        "geolora",
        GeoLoraConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
]

# PEFT's row lists, by identity, and what replaces them.
_REPLACEMENTS = {
    id(_tcm.TEST_CASES): GEO_CASES,
    id(_tcm.ALL_PEFT_CONFIG_CLASSES): [GeoLoraConfig],
    id(_tcm.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): GEO_MULTI_ADAPTER_CASES,
}


def _regeo(cls: type) -> type:
    """A subclass of a PEFT test class whose row-parametrized tests run GeoLoRA rows; all other tests hidden."""
    namespace = {}
    for name, fn in vars(cls).items():
        marks = getattr(fn, "pytestmark", [])
        rows = [m for m in marks if m.name == "parametrize" and id(m.args[1]) in _REPLACEMENTS]
        if not (name.startswith("test_") and rows):
            continue
        clone = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        clone.__dict__.update(fn.__dict__)
        clone.pytestmark = [m for m in marks if m not in rows] + [
            pytest.mark.parametrize(m.args[0], _REPLACEMENTS[id(m.args[1])]).mark for m in rows
        ]
        namespace[name] = clone
    for name in dir(cls):
        if name.startswith("test_") and name not in namespace:
            namespace[name] = None
    return type(f"{cls.__name__}GeoLora", (cls,), namespace)


TestPeftCustomModelGeoLora = _regeo(_tcm.TestPeftCustomModel)
TestMultipleActiveAdaptersGeoLora = _regeo(_tcm.TestMultipleActiveAdapters)
TestRequiresGradGeoLora = _regeo(_tcm.TestRequiresGrad)
del _tcm
