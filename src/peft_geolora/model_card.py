"""The GeoLoRA part of an adapter's model card: how to load it, its size and its final ranks per layer.

One function, :func:`geolora_section`, writes it for every card: PEFT's own card (``save_pretrained`` calls
``PeftModel.create_or_update_model_card``, which :func:`install` wraps in memory, once, and ``push_to_hub`` runs it
again on the card it uploads) and the GLUE script's. The section sits between two HTML comments, so saving again replaces it instead of appending a copy.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

from torch import nn

from .layer import GeoLoraLayer


BEGIN, END = "<!-- peft-geolora: begin -->", "<!-- peft-geolora: end -->"
_PEFT_PREFIX = "base_model.model."


def adapter_ranks(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, int]]:
    """Per adapted layer (module name without PEFT's prefix): (active rank r, parameters r (m + n + r))."""
    return {
        name.removeprefix(_PEFT_PREFIX): (module.rank[adapter_name], module.num_active_parameters(adapter_name))
        for name, module in model.named_modules()
        if isinstance(module, GeoLoraLayer) and adapter_name in module.geolora_U
    }


def geolora_section(
    ranks: dict[str, tuple[int, int]], base_model: Optional[str], auto_class: str = "AutoModel"
) -> str:
    """Markdown: loading instructions, adapter size, and a table of the final ranks (``ranks`` as from
    :func:`adapter_ranks`)."""
    total_rank = sum(r for r, _ in ranks.values())
    total_params = sum(p for _, p in ranks.values())
    rows = "\n".join(f"| `{name}` | {r} | {p:,} |" for name, (r, p) in ranks.items())
    base = base_model or "<base model>"
    return "\n".join(
        [
            BEGIN,
            "## GeoLoRA adapter",
            "",
            (
                f"A rank-adaptive GeoLoRA adapter ([arXiv 2410.18720](https://arxiv.org/abs/2410.18720), package "
                f"`peft-geolora`) on {len(ranks)} layers: total rank {total_rank}, {total_params:,} adapter "
                "parameters (Σ r (m + n + r))."
            ),
            "",
            "GeoLoRA is a plugin tuner: `import peft_geolora` before loading, or PEFT fails with `KeyError: 'GEOLORA'`.",
            "",
            "```python",
            "import peft_geolora  # pip install peft-geolora; registers the 'geolora' tuner type with PEFT",
            "from peft import PeftModel",
            f"from transformers import {auto_class}",
            "",
            f'base = {auto_class}.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "<this repository>")',
            "```",
            "",
            "`peft_geolora.export_to_lora` converts it to a plain LoRA adapter, exactly, for LoRA-only tools.",
            "",
            "### Final ranks",
            "",
            "| layer | rank | parameters |",
            "|---|---|---|",
            rows,
            END,
        ]
    )


def replace_section(text: str, section: str) -> str:
    """``text`` with its GeoLoRA section (between :data:`BEGIN` and :data:`END`) replaced, or ``section`` appended."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def install() -> None:
    """Wrap ``peft.PeftModel.create_or_update_model_card`` once (idempotent): GeoLoRA adapters get their section."""
    from huggingface_hub import ModelCard
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_geolora_wrapped", False):
        return

    @functools.wraps(original)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> Any:
        result = original(self, output_dir)
        config = self.peft_config.get(self.active_adapter)
        if getattr(config, "peft_type", None) != "GEOLORA":
            return result
        filename = os.path.join(output_dir, "README.md")
        card = ModelCard.load(filename)
        card.data.tags = sorted(set(card.data.tags or []) | {"geolora"})
        task = str(getattr(config.task_type, "value", config.task_type))
        section = geolora_section(
            adapter_ranks(self, self.active_adapter),
            card.data.base_model or config.base_model_name_or_path,
            _AUTO_CLASSES.get(task, "AutoModel"),
        )
        card.text = replace_section(card.text, section)
        card.save(filename)
        return result

    create_or_update_model_card._geolora_wrapped = True
    PeftModel.create_or_update_model_card = create_or_update_model_card

    # transformers' push_to_hub overwrites the saved README.md with the repository's card (or its own template)
    # just before uploading; PEFT's card mechanism then runs again on that card, so the pushed card has it too.
    upload = PeftModel._upload_modified_files

    @functools.wraps(upload)
    def _upload_modified_files(self: PeftModel, working_dir: str, *args: Any, **kwargs: Any) -> Any:
        config = self.peft_config.get(self.active_adapter)
        if getattr(config, "peft_type", None) == "GEOLORA":
            self.create_or_update_model_card(working_dir)
        return upload(self, working_dir, *args, **kwargs)

    PeftModel._upload_modified_files = _upload_modified_files
