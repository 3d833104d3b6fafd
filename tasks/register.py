"""Register a model that passed the gate, with its lineage, in the local registry or Azure ML.

Only the flow calls this, and only after the gate passed; the registry entry holds the ONNX folder (with
its adapter), the report and ``lineage.json``. Nothing secret goes into the lineage: the config holds no
credentials (Azure authenticates through DefaultAzureCredential's environment), and the lineage is built
from the config, hashes, metrics and versions only.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from olivepress.cache_keys import library_versions
from olivepress.registry import LocalRegistry, Registration, content_sha256, default_model_name
from olivepress.retry import retry_if_transient

if TYPE_CHECKING:
    from olivepress.config import RunConfig
    from olivepress.tasks.evaluate import Evaluation


def build_lineage(
    config: RunConfig,
    base_model: Path,
    data_hash: str,
    evaluation: Evaluation,
    sources: dict[str, Path],
    flow_run_id: str | None,
    model_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The registry's record of a model. Metrics are the evaluation's raw numbers per variant (``VariantMetrics``
    as a dict, unrounded, units in the field names, as in evaluation.json); the gate record is every check's
    name, description, measured value, limit and verdict. Readers format them (``metrics_display``)."""
    return {
        # the model and its adapters alone: a re-run's report differs in its timings, yet it registers the
        # same model
        "content_sha256": content_sha256({key: path for key, path in sources.items() if key != "report"}),
        "base_model": str(base_model),
        # where the base model came from: reference, kind, hub commit or Azure ML version, content hash
        "model_source": model_source,
        "data": {"path": str(config.data), "sha256": data_hash},
        "config": config.model_dump(mode="json"),
        "metrics": [asdict(m) for m in evaluation.metrics],
        "gate": asdict(evaluation.gate),
        "library_versions": library_versions(),
        "flow_run_id": flow_run_id,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def register_model(
    config: RunConfig, base_model: Path | str, sources: dict[str, Path], lineage: dict
) -> Registration:
    """Register in the backend the config names; an identical earlier registration is returned, not repeated."""
    name = config.registry.name or default_model_name(base_model)
    if config.registry.backend == "azureml":
        from olivepress.azure_registry import register_azureml

        return register_azureml(config.registry.azureml, name, sources, lineage)
    return LocalRegistry(config.registry.path).register(name, sources, lineage)


@task(
    name="register",
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
    tags=["olivepress"],
)
def register_task(
    config: RunConfig, base_model: Path | str, sources: dict[str, Path], lineage: dict
) -> Registration:
    """A registry over the network (Azure 429/5xx) fails transiently: the flow retries this task as the
    config's ``retries.*`` say (:func:`olivepress.steps.prefect_retries`), a transient failure only."""
    return register_model(config, base_model, sources, lineage)
