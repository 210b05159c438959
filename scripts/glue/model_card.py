"""The model card written next to every adapter the GLUE script saves (and pushes with ``--push_to_hub``)."""

from __future__ import annotations

from typing import Any, Optional

from peft_geolora.model_card import geolora_section


def model_card(results: dict[str, Any], geolora_ranks: Optional[dict[str, tuple[int, int]]] = None) -> str:
    """Markdown with Hub metadata: base model, tuner, metrics; for GeoLoRA (``geolora_ranks`` from
    :func:`peft_geolora.model_card.adapter_ranks`) the package's own section: loading, size, final ranks."""
    method = results["method"]
    tuner = {
        "geolora": "GeoLoRA (peft-geolora)",
        "lora": "LoRA",
        "adalora": "AdaLoRA",
        "adamss": "AdaMSS",
        "full": "Full fine-tuning",
    }[method]
    metrics = "\n".join(
        f"| {split} | {name} | {value:.4f} |"
        for split, values in results["metrics"].items()
        for name, value in values.items()
    )
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {results['base_model']}",
        "tags:",
        "- peft",
        f"- {method}",
        f"- {results['task']}",
        "---",
        "",
        f"# {tuner} adapter for {results['base_model']} on `{results['task']}`",
        "",
        (
            f"Trained with `scripts/glue/run_glue.py` for {results['steps']} optimizer steps "
            f"({results['trainable_adapter_params_end']:,} trainable adapter parameters at the end)."
        ),
        "",
        "| split | metric | value |",
        "|---|---|---|",
        metrics,
        "",
    ]
    if geolora_ranks is not None:
        lines.append(geolora_section(geolora_ranks, results["base_model"], "AutoModelForSequenceClassification"))
    return "\n".join(lines)
