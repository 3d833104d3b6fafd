"""The Azure ML registry backend: the same entry folder as the local registry, as a custom_model asset.

Azure modules are imported inside the functions, so importing this module (and the CLI) stays cheap.
Authentication is DefaultAzureCredential's (environment, managed identity, Azure CLI login...); nothing
secret is read from the config or written to the lineage, tags or properties.

Errors: access or workspace problems (401, 403, a missing workspace, no usable credential, the SDK's
validation errors such as missing storage roles) become a ``UserError`` naming ``registry.azureml``, since
retrying cannot fix them; throttling (429), server errors (5xx) and connection errors propagate unchanged
for the register task's retry.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olivepress.errors import UserError
from olivepress.metrics_display import readable
from olivepress.registry import LINEAGE_FILE, Registration, assemble_entry

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.ai.ml.entities import Model

    from olivepress.config import AzureMLSettings

TAG_PREFIX = "olivepress."
CONTENT_TAG = f"{TAG_PREFIX}content_sha256"
# Metrics of each variant as tags, so the studio's model list shows them without opening lineage.json: tag
# olivepress.<variant>.<column>, the column of the report's display row (metrics_display.display_row) that is
# formatted from the lineage's raw field: perplexity (perplexity, 2 decimals), rouge_l (rouge_l, 4 decimals),
# decode_tok_s (decode_tokens_per_s, 1 decimal), size_mb (bytes_on_disk / 1e6, 1 decimal).
TAG_METRICS = ("perplexity", "rouge_l", "decode_tok_s", "size_mb")
# Azure ML documents 1,000 characters per property or tag value (its run limits; assets publish none). A longer
# value would be refused, and a truncated JSON value would be misleading: it points to lineage.json instead.
MAX_VALUE_CHARS = 1000
TOO_LONG = f"(longer than {MAX_VALUE_CHARS} characters: see {LINEAGE_FILE} in the model's files)"
CHECK_CONFIG = "registry.azureml (subscription_id, resource_group, workspace_name)"


def register_azureml(
    settings: AzureMLSettings,
    name: str,
    sources: dict[str, Path],
    lineage: dict[str, Any],
    *,
    credential: Any = None,
    **client_kwargs: Any,
) -> Registration:
    """Upload the entry as the next version of ``name``, or return the version that already holds this content.

    ``client_kwargs`` go to ``MLClient`` (and from there to azure-core, e.g. ``transport``, ``retry_total``).
    Versions are listed including archived ones, so a version number is never taken twice. The version is
    chosen here rather than by the SDK's auto-increment, which would upload before knowing the version and
    then rewrite the blob metadata. Two processes registering the same name at once may pick the same
    version: the service refuses to change an existing version's files (the SDK raises AssetPathException,
    not a ``UserError``), so the register task's retry lists again and takes the next one.
    """
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    client = _client(settings, credential, client_kwargs)
    with _user_errors(settings):
        _check_workspace(client, settings)
        versions = _versions(client, name)
        for model in versions:
            if (model.tags or {}).get(CONTENT_TAG) == lineage["content_sha256"]:
                return Registration("azureml", name, str(model.version), str(model.id), reused=True)
        version = str(max((int(m.version) for m in versions if str(m.version).isdigit()), default=0) + 1)
        with tempfile.TemporaryDirectory(prefix="olivepress-azureml-") as staging:
            # The folder's name becomes part of the blob path: the model name reads better than a random one.
            entry = Path(staging) / name
            entry.mkdir()
            assemble_entry(entry, sources, lineage)
            created = client.models.create_or_update(
                Model(
                    path=str(entry),
                    type=AssetTypes.CUSTOM_MODEL,
                    name=name,
                    version=version,
                    description=f"olivepress fine-tuned ONNX model of {lineage.get('base_model', 'a base model')};"
                    f" full lineage in {LINEAGE_FILE}.",
                    tags=lineage_tags(lineage),
                    properties=lineage_properties(lineage),
                )
            )
    return Registration("azureml", name, str(created.version), str(created.id), reused=False)


def list_azureml(settings: AzureMLSettings, *, credential: Any = None, **client_kwargs: Any) -> list[dict]:
    """Every version registered by olivepress (it carries the content tag), for ``olivepress models``.

    One request lists the workspace's models, then one per model lists its active versions; versions of
    models that olivepress did not register are left out.
    """
    client = _client(settings, credential, client_kwargs)
    with _user_errors(settings):
        _check_workspace(client, settings)
        found = []
        for container in client.models.list():
            for model in client.models.list(name=container.name):
                tags = model.tags or {}
                if CONTENT_TAG in tags:
                    found.append({"name": model.name, "version": str(model.version), "tags": dict(tags)})
    return sorted(
        found, key=lambda row: (row["name"], int(row["version"]) if row["version"].isdigit() else 0)
    )


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """A short, searchable summary: content and data hashes, flow run, gate verdict, key metrics per variant
    (tags are strings: the metrics are formatted here from the lineage's raw values, see ``TAG_METRICS``).

    The top-level verdict and variants' metrics are the lineage's top-level ``metrics`` and ``gate`` (the
    first passing adapter on its first passing target). Then the targets that passed (``olivepress.targets``,
    e.g. ``cpu,cuda``), each with its gate and fine-tuned metrics (``olivepress.target.<target>.*``), and the
    adapters (``olivepress.adapters``), each with its gate and fine-tuned metrics per target
    (``olivepress.adapter.<name>.<target>.*``; a target the adapter failed on: its gate "failed", no metrics).
    """
    gate = lineage.get("gate") or {}
    tags = {
        CONTENT_TAG: lineage["content_sha256"],
        f"{TAG_PREFIX}data_sha256": (lineage.get("data") or {}).get("sha256"),
        f"{TAG_PREFIX}flow_run_id": lineage.get("flow_run_id"),
        f"{TAG_PREFIX}gate": "passed" if gate.get("passed") else "failed",
    }
    for raw in lineage.get("metrics") or []:
        row = readable(raw)
        for metric in TAG_METRICS:
            tags[f"{TAG_PREFIX}{row['variant']}.{metric}"] = row.get(metric)
    if targets := lineage.get("targets"):
        tags[f"{TAG_PREFIX}targets"] = ",".join(targets)
        for target, measured in targets.items():
            tags |= _summary_tags(f"{TAG_PREFIX}target.{target}", measured)
    if adapters := lineage.get("adapters"):
        tags[f"{TAG_PREFIX}adapters"] = ",".join(adapters)
        for name, record in adapters.items():
            for target, measured in (record.get("targets") or {}).items():
                tags |= _summary_tags(f"{TAG_PREFIX}adapter.{name}.{target}", measured)
    return {key: _fit(_text(value)) for key, value in tags.items() if value is not None}


def _summary_tags(prefix: str, measured: dict[str, Any]) -> dict[str, Any]:
    """``<prefix>.gate`` (passed or failed) and the fine-tuned variant's ``TAG_METRICS`` of one target's
    measurements (``{"metrics", "gate"}``; ``{"failure"}`` where it failed before its gate: failed alone)."""
    tags: dict[str, Any] = {
        f"{prefix}.gate": "passed" if (measured.get("gate") or {}).get("passed") else "failed"
    }
    tuned = next(
        (readable(raw) for raw in measured.get("metrics") or [] if raw["variant"] == "fine-tuned"), {}
    )
    for metric in TAG_METRICS:
        tags[f"{prefix}.{metric}"] = tuned.get(metric)
    return tags


def lineage_properties(lineage: dict[str, Any]) -> dict[str, str]:
    """The lineage as strings (JSON for structures), one property per top-level config key and one per variant's
    raw metrics (``olivepress.metrics.<variant>``: the three unrounded together come close to the 1,000-character
    limit, about 950 at full precision); per target that passed its gate and each variant's raw metrics
    (``olivepress.target.<target>.gate``, ``...metrics.<variant>``); per adapter its record
    (``olivepress.adapter.<name>``: data, pair counts) and per target its file and hash (or failure), gate
    and each variant's raw metrics (``olivepress.adapter.<name>.<target>[.gate|.metrics.<variant>]``), apart.

    The tags' summary is repeated here on purpose: tags can be edited later, properties cannot, so these
    record what the model was built from. ``lineage.json`` in the model's files stays the complete record.
    """
    flat = {f"{TAG_PREFIX}config.{key}": value for key, value in (lineage.get("config") or {}).items()}
    flat |= {f"{TAG_PREFIX}metrics.{raw['variant']}": raw for raw in lineage.get("metrics") or []}
    flat |= {
        f"{TAG_PREFIX}{key}": value
        for key, value in lineage.items()
        if key not in ("config", "metrics", "adapters", "targets")
    }
    for target, measured in (lineage.get("targets") or {}).items():
        flat |= _measured_properties(f"{TAG_PREFIX}target.{target}", measured)
    for name, record in (lineage.get("adapters") or {}).items():  # each adapter's record, split to fit
        prefix = f"{TAG_PREFIX}adapter.{name}"
        flat[prefix] = {key: value for key, value in record.items() if key != "targets"}
        for target, measured in (record.get("targets") or {}).items():
            flat |= _measured_properties(f"{prefix}.{target}", measured)
    return {key: _fit(_text(value)) for key, value in sorted(flat.items())}


def _measured_properties(prefix: str, measured: dict[str, Any]) -> dict[str, Any]:
    """One target's measurements split to fit: what is left besides them (an adapter's file and hash, or
    its failure) as ``prefix``, the gate as ``<prefix>.gate``, each variant's raw metrics apart."""
    flat: dict[str, Any] = {
        f"{prefix}.metrics.{raw['variant']}": raw for raw in measured.get("metrics") or []
    }
    if "gate" in measured:
        flat[f"{prefix}.gate"] = measured["gate"]
    if rest := {key: value for key, value in measured.items() if key not in ("metrics", "gate")}:
        flat[prefix] = rest
    return flat


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _fit(value: str) -> str:
    return value if len(value) <= MAX_VALUE_CHARS else TOO_LONG


def _client(settings: AzureMLSettings, credential: Any, client_kwargs: dict[str, Any]) -> MLClient:
    from azure.ai.ml import MLClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    # show_progress stays on (the SDK default): with it off, the SDK's directory upload never collects its
    # upload threads' results, so a failed file upload leaves it waiting forever instead of raising.
    return MLClient(
        credential,
        settings.subscription_id,
        settings.resource_group,
        settings.workspace_name,
        **client_kwargs,
    )


def _check_workspace(client: MLClient, settings: AzureMLSettings) -> None:
    """Fetch the workspace first: a missing one would otherwise look like "no versions yet" to the listing."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        client.workspaces.get(settings.workspace_name)
    except ResourceNotFoundError as error:
        raise UserError(
            f"registry.azureml: workspace {settings.workspace_name!r} was not found in resource group "
            f"{settings.resource_group!r} of subscription {settings.subscription_id!r} ({_code(error)}). "
            f"Check {CHECK_CONFIG}."
        ) from error


def _versions(client: MLClient, name: str) -> list[Model]:
    from azure.ai.ml.constants import ListViewType
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return list(client.models.list(name=name, list_view_type=ListViewType.ALL))
    except ResourceNotFoundError:
        return []


@contextmanager
def _user_errors(settings: AzureMLSettings) -> Iterator[None]:
    """Turn refusals that a retry cannot fix into a ``UserError``; the message names no credential or token."""
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    try:
        yield
    except ValidationException as error:  # the SDK's own verdict, e.g. no write access to the datastore
        raise UserError(f"registry.azureml: Azure ML refused the model: {error}") from error
    except ClientAuthenticationError as error:
        raise UserError(
            f"registry.azureml: could not authenticate to Azure ({_code(error)}). DefaultAzureCredential needs "
            "a signed-in identity: `az login`, a managed identity, or AZURE_TENANT_ID/AZURE_CLIENT_ID with a "
            f"client secret or certificate in the environment. Also check {CHECK_CONFIG}."
        ) from error
    except HttpResponseError as error:
        if error.status_code != 403:
            raise
        raise UserError(
            f"registry.azureml: Azure refused access to workspace {settings.workspace_name!r} "
            f"({_code(error)}). The signed-in identity needs a role on the workspace that may read and "
            f"register models (e.g. AzureML Data Scientist) and write to its default datastore. Check {CHECK_CONFIG}."
        ) from error


def _code(error: Exception) -> str:
    """The status and service error code (e.g. ``404 ResourceNotFound``), never the response body."""
    status = getattr(error, "status_code", None)
    code = getattr(getattr(error, "error", None), "code", None)
    return " ".join(str(part) for part in (status, code) if part) or type(error).__name__
