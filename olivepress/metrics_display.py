"""How a variant's raw metrics read: the rounded display row of the report, ``olivepress models`` and the Azure tags.

Records keep the raw numbers (``evaluation.json``, the registry's lineage: ``VariantMetrics`` of
``tasks/evaluate.py`` as a dict, units in the field names); this turns one such dict into the columns people
read. Pure and cheap to import: the CLI's listing uses it without loading Prefect or the evaluation code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The variants evaluate measures, as every record names them.
BASE, QUANTIZED, FINE_TUNED = "base", "quantized", "fine-tuned"
# The field every raw record has and no display row has: what tells the two forms apart.
RAW_MARKER = "decode_tokens_per_s"


def is_raw(row: Mapping[str, Any]) -> bool:
    """True for raw metrics; False for a display row (the lineage of entries registered before raw metrics)."""
    return RAW_MARKER in row


def _rounded(value: float | None, digits: int | None) -> float | int | None:
    return None if value is None else round(value, digits)


def display_row(raw: Mapping[str, Any], *, gpu_memory: bool | None = None) -> dict[str, Any]:
    """One variant's raw metrics rounded for reading, under the report's column names.

    ``gpu_memory`` says whether the ``gpu_mem_mib`` column is there (a table has it for every row or none);
    by default it is there when this variant's GPU memory was measured.
    """
    if gpu_memory is None:
        gpu_memory = raw.get("gpu_memory_mib") is not None
    return {
        "variant": raw["variant"],
        "loss": round(raw["loss"], 4),
        "perplexity": round(raw["perplexity"], 2),
        "rouge_l": _rounded(raw["rouge_l"], 4),  # None: the variant answered nothing freely
        "decode_tok_s": round(raw["decode_tokens_per_s"], 1),
        "first_token_s": round(raw["time_to_first_token_s"], 3),
        "size_mb": round(raw["bytes_on_disk"] / 1e6, 1),
        "peak_mem_mib": _rounded(raw.get("peak_memory_mib"), None),
        **({"gpu_mem_mib": _rounded(raw.get("gpu_memory_mib"), None)} if gpu_memory else {}),
    }


def display_rows(raws: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A table of display rows; GPU memory is a column when it was measured for any variant (a GPU run)."""
    gpu_memory = any(raw.get("gpu_memory_mib") is not None for raw in raws)
    return [display_row(raw, gpu_memory=gpu_memory) for raw in raws]


def readable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored metrics row as a display row, whichever form it was stored in (old lineage holds display rows)."""
    return display_row(row) if is_raw(row) else dict(row)
