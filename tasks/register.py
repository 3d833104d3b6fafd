"""Register a model that passed the gate, with its lineage, in the local registry or Azure ML.

Only the flow calls this, and only with what passed its gate; the registry entry holds ``model/<target>/``
(each target's export, with the first dataset's adapter where it passed), ``adapters/<target>/``, the report
(as written before registering: its opening line gives the name, the version being the entry's own) and
``lineage.json``. Nothing secret goes into the lineage: the config holds no
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

from olivepress.registry import (
    ADAPTER_SUFFIX,
    ADAPTERS_DIR,
    LocalRegistry,
    Registration,
    content_sha256,
    default_model_name,
)
from olivepress.retry import retry_if_transient
from olivepress.store.cache_keys import library_versions

if TYPE_CHECKING:
    from olivepress.config import RunConfig
    from olivepress.tasks.report import AdapterOutcome


def build_lineage(
    config: RunConfig,
    base_model: Path,
    data_hash: str,
    outcomes: list[AdapterOutcome],
    sources: dict[str, Path],
    flow_run_id: str | None,
    model_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The registry's record of a model: where it came from (base model, data, config, library versions,
    flow run) and, per adapter and target, its measurements and gate. Metrics are the evaluation's raw
    numbers per variant (``VariantMetrics`` as a dict, unrounded, units in the field names, as in
    evaluation.json); a gate record is every check's name, description, measured value, limit and verdict.
    Readers format them (``metrics_display``).

    ``targets``: the targets that passed, each with its first passing adapter's metrics and gate;
    ``metrics`` and ``gate``: the first of those (what a listing shows first). ``adapters``: per adapter
    that passed somewhere, its data and per target its file in the entry and measurements, or why it
    failed there; ``failed_adapters``: the adapters that passed nowhere, and why. ``sources``' ``adapters``
    folder holds ``<target>/<name>.onnx_adapter`` for every adapter that passed on that target."""
    from olivepress.files import file_sha256

    adapters, failed, targets = {}, {}, {}
    for outcome in outcomes:
        data = {"path": outcome.data, "sha256": outcome.data_sha256}
        failures = [t.failure for t in outcome.targets if t.failure]
        if outcome.failure or len(failures) == len(outcome.targets):
            failed[outcome.name] = {"data": data, "failure": outcome.failure or "; ".join(failures)}
            continue
        record: dict[str, Any] = {
            "data": data,
            "train_pairs": outcome.train_pairs,
            "held_out_pairs": outcome.held_out_pairs,
            "targets": {},
        }
        for target in outcome.targets:
            if target.failure:
                record["targets"][target.target] = {"failure": target.failure}
                continue
            file = f"{ADAPTERS_DIR}/{target.target}/{outcome.name}{ADAPTER_SUFFIX}"
            measured = {
                "metrics": [asdict(m) for m in target.evaluation.metrics],
                "gate": asdict(target.evaluation.gate),
            }
            record["targets"][target.target] = {
                "file": file,
                "sha256": file_sha256(sources[ADAPTERS_DIR].parent / file),
                **measured,
            }
            targets.setdefault(target.target, measured)
        adapters[outcome.name] = record
    first = next(iter(targets.values()))
    in_model = outcomes[0].name if outcomes[0].name in adapters else None
    return {
        # the model and its adapters alone: a re-run's report differs in its timings, yet it registers the
        # same model
        "content_sha256": content_sha256({key: path for key, path in sources.items() if key != "report"}),
        "base_model": str(base_model),
        # where the base model came from: reference, kind, hub commit or Azure ML version, content hash
        "model_source": model_source,
        "data": {
            "path": str(config.data) if config.datasets is None else None,
            "sha256": data_hash,  # of the datasets AWQ calibrated on, joined (one dataset: its own)
            # the datasets AWQ calibrated on: those named, else every one that passed validation
            "calibration_datasets": config.calibration_datasets or [o.name for o in outcomes if o.n_records],
            "datasets": {o.name: {"path": o.data, "sha256": o.data_sha256} for o in outcomes},
        },
        "config": config.model_dump(mode="json"),
        "targets": targets,
        "metrics": first["metrics"],
        "gate": first["gate"],
        "adapters": adapters,
        "failed_adapters": failed,
        # the adapter whose files (and merged graph) the entry's model/<target>/ holds where it passed
        "model_adapter": in_model,
        "library_versions": library_versions(),
        "flow_run_id": flow_run_id,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def registry_name(config: RunConfig, base_model: Path | str) -> str:
    """The name a model is registered under; the report names it before the registry gives a version."""
    return config.registry.name or default_model_name(base_model)


def register_model(
    config: RunConfig, base_model: Path | str, sources: dict[str, Path], lineage: dict
) -> Registration:
    """Register in the backend the config names; an identical earlier registration is returned, not repeated."""
    name = registry_name(config, base_model)
    if config.registry.backend == "azureml":
        from olivepress.registry.azureml import register_azureml

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
