"""The model card written next to every adapter the GLUE script saves (and pushes with ``--push_to_hub``)."""

from __future__ import annotations

from typing import Any


def model_card(results: dict[str, Any]) -> str:
    """Markdown with Hub metadata: base model, tuner, final ranks, metrics, and how to load the adapter."""
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
    if method == "geolora":
        ranks = "\n".join(
            f"| `{name.removeprefix('base_model.model.')}` | {rank} |" for name, rank in results["ranks"].items()
        )
        lines += [
            "## Loading",
            "",
            "GeoLoRA is a plugin tuner: `import peft_geolora` before loading, or PEFT fails with `KeyError: 'GEOLORA'`.",
            "",
            "```python",
            "import peft_geolora  # pip install peft-geolora; registers the 'geolora' tuner with PEFT",
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification",
            "",
            f'base = AutoModelForSequenceClassification.from_pretrained("{results["base_model"]}")',
            'model = PeftModel.from_pretrained(base, "<this repository>")',
            "```",
            "",
            "## Final ranks",
            "",
            "| layer | rank |",
            "|---|---|",
            ranks,
            "",
        ]
    return "\n".join(lines)
