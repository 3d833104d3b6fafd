"""Resolve a model reference into a local Hugging Face model folder, once per run (issue #12).

A reference is one of:

* a local folder: used as it is;
* a Hugging Face id with an optional revision, ``org/name`` or ``org/name@rev``: fetched by
  ``huggingface_hub.snapshot_download`` into its normal cache (``HF_HOME``/``HF_HUB_CACHE``), which also
  applies ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` itself;
* an Azure ML model asset, ``azureml://registries/<registry>/models/<name>/versions/<v>`` or
  ``azureml://subscriptions/<sub>/resourceGroups/<rg>/workspaces/<ws>/models/<name>/versions/<v>``:
  downloaded with azure-ai-ml's ``MLClient.models.download`` (``DefaultAzureCredential``, as the registry
  backend); a version never changes, so one download per version is kept under ``cache_dir``;
* an ``s3://bucket/prefix/`` folder: every file under the prefix downloaded with s3fs, with the store's
  S3 options and retries (each file retried on its own), afresh each time (the bucket may have changed).

The answer, :class:`ResolvedModel`, carries the folder's content hash (:func:`olivepress.files.folder_sha256`):
cache keys and lineage must use that, never the reference string, so the same weights from two places are
the same input. A reference that cannot be resolved for a reason the user must fix (no such model, a gated
one, not in the cache while offline, a malformed ``azureml://`` id, an empty prefix, no ``config.json``) is
a :class:`~olivepress.errors.UserError` naming the reference and the case.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from olivepress.errors import UserError
from olivepress.files import atomic_dir, folder_sha256, move_into_place, staging_dir
from olivepress.retry import RetryPolicy, with_retries

Kind = Literal["local", "huggingface", "azureml", "s3"]

# org/name with an optional @revision: the hub's own name rules (letters, digits, '-', '_', '.')
HF_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")
# one path segment of an Azure name (also a folder name in the download cache: never "." or "..")
_SEGMENT = r"[A-Za-z0-9][\w.()-]*"
AZUREML_REGISTRY = re.compile(
    rf"^azureml://registries/(?P<registry>{_SEGMENT})/models/(?P<name>{_SEGMENT})/versions/(?P<version>{_SEGMENT})$"
)
AZUREML_WORKSPACE = re.compile(
    rf"^azureml://subscriptions/(?P<subscription>{_SEGMENT})/resourceGroups/(?P<resource_group>{_SEGMENT})"
    rf"/workspaces/(?P<workspace>{_SEGMENT})/models/(?P<name>{_SEGMENT})/versions/(?P<version>{_SEGMENT})$",
    re.IGNORECASE,  # ARM paths are case-insensitive ("resourcegroups" is seen too)
)
AZUREML_FORMS = (
    "azureml://registries/<registry>/models/<name>/versions/<version> or "
    "azureml://subscriptions/<subscription>/resourceGroups/<group>/workspaces/<workspace>/models/<name>/versions/<version>"
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved into a local folder. ``revision``: the Hugging Face commit or the Azure ML
    version when known; ``content_sha256``: the folder's digest, the model's identity for caches."""

    path: Path
    reference: str
    kind: Kind
    revision: str | None
    content_sha256: str

    @property
    def name(self) -> str:
        """The model's own name (the default registry name derives from it): the local folder's, the hub
        repository's, the Azure ML asset's, the s3:// folder's; never the hub cache's snapshot hash."""
        if self.kind == "local":
            return self.path.name
        if self.kind == "azureml":
            return parse_azureml(self.reference).name
        return self.reference.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    def lineage(self) -> dict[str, Any]:
        """Where the model came from, for the registry's lineage (JSON-ready)."""
        return {**asdict(self), "path": str(self.path)}


@dataclass(frozen=True)
class AzureMLAsset:
    name: str
    version: str
    registry: str | None = None
    subscription: str | None = None
    resource_group: str | None = None
    workspace: str | None = None


def reference_kind(reference: str | Path) -> Kind:
    """Which kind of reference this is (by its form; a Hugging Face id that is also a local folder is the folder)."""
    text = str(reference)
    if text.startswith("s3://"):
        return "s3"
    if text.startswith("azureml://"):
        return "azureml"
    if Path(text).expanduser().is_dir() or not HF_ID.match(text):
        return "local"
    return "huggingface"


def parse_azureml(reference: str) -> AzureMLAsset:
    """The parts of an ``azureml://`` model asset id, either form; a UserError for anything else."""
    if match := AZUREML_REGISTRY.match(reference):
        return AzureMLAsset(match["name"], match["version"], registry=match["registry"])
    if match := AZUREML_WORKSPACE.match(reference):
        return AzureMLAsset(
            match["name"],
            match["version"],
            subscription=match["subscription"],
            resource_group=match["resource_group"],
            workspace=match["workspace"],
        )
    raise UserError(f"model {reference!r} is not an Azure ML model asset id: expected {AZUREML_FORMS}.")


def resolve_model(
    reference: str | Path,
    *,
    cache_dir: Path,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    credential: Any = None,
    **client_kwargs: Any,
) -> ResolvedModel:
    """Resolve ``reference`` into a local model folder (see the module docstring).

    ``cache_dir`` receives s3:// and Azure ML downloads (Hugging Face ids use the hub's own cache);
    ``storage_options`` and ``retry`` are the store's S3 options and retry policy; ``credential`` and
    ``client_kwargs`` go to ``MLClient`` (default credential: ``DefaultAzureCredential``).
    """
    text = str(reference)
    kind = reference_kind(text)
    retry = retry or RetryPolicy()
    revision = None
    if kind == "s3":
        path = _download_s3(text, cache_dir, storage_options or {}, retry)
    elif kind == "azureml":
        asset = parse_azureml(text)
        path = with_retries(
            lambda: _download_azureml(text, asset, cache_dir, credential, client_kwargs),
            f"downloading {text}",
            retry,
        )
        revision = asset.version
    elif kind == "huggingface":
        path, revision = with_retries(lambda: _download_hf(text), f"fetching {text}", retry)
    else:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise UserError(
                f"model {text!r} is neither a local folder nor a Hugging Face id (org/name[@revision]), "
                "an azureml:// asset id or an s3:// folder."
            )
        path = path.resolve()
    folder = _model_folder(path, text, nested=kind == "azureml")
    return ResolvedModel(folder, text, kind, revision, folder_sha256(folder))


def _model_folder(root: Path, reference: str, *, nested: bool = False) -> Path:
    """The folder holding the model's ``config.json``: ``root`` itself, or with ``nested`` the shallowest
    folder under it (an Azure ML download nests the files under the model's name and its upload folder's)."""
    if (root / "config.json").is_file():
        return root
    found = nested and sorted(root.rglob("config.json"), key=lambda path: (len(path.parts), str(path)))
    if not found:
        raise UserError(
            f"model {reference!r}: no config.json in {root}, so it is not a Hugging Face model folder."
        )
    return found[0].parent


# --- Hugging Face -------------------------------------------------------------------------------------


def _download_hf(reference: str) -> tuple[Path, str | None]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HF_ID.match(reference)
    repo_id, revision = match["repo"], match["revision"]
    try:
        # local_files_only in offline mode: huggingface_hub 1.33 reads the cache by itself when offline for a
        # branch or tag, but for a commit hash it still lists the repository and fails (OfflineModeIsEnabled)
        folder = Path(
            snapshot_download(repo_id, revision=revision, local_files_only=constants.HF_HUB_OFFLINE)
        )
    except GatedRepoError as error:  # before RepositoryNotFoundError: it is a subclass
        raise UserError(
            f"model {reference!r} is a gated Hugging Face repository: accept its terms on huggingface.co "
            "with your account and set HF_TOKEN to a token of that account."
        ) from error
    except RevisionNotFoundError as error:
        raise UserError(
            f"model {reference!r}: revision {revision!r} does not exist in Hugging Face repository {repo_id!r}."
        ) from error
    except RepositoryNotFoundError as error:
        raise UserError(
            f"model {reference!r} was not found on the Hugging Face hub (no such repository, or a private "
            "one that HF_TOKEN cannot read)."
        ) from error
    except LocalEntryNotFoundError as error:  # also a cached snapshot with files missing
        where = (
            f"model {reference!r} is not (completely) in the Hugging Face cache at {constants.HF_HUB_CACHE}"
        )
        if not constants.HF_HUB_OFFLINE:  # the hub is down or unreachable: a retry may fix it
            raise ConnectionError(f"{where} and the Hugging Face hub cannot be reached ({error})") from error
        raise UserError(
            f"{where} and offline mode is on (HF_HUB_OFFLINE=1): download it once while online, or point "
            "HF_HOME at a cache that holds it."
        ) from error
    # the hub cache keeps each commit in snapshots/<commit hash>/
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, commit


# --- Azure ML -----------------------------------------------------------------------------------------


def _download_azureml(
    reference: str, asset: AzureMLAsset, cache_dir: Path, credential: Any, client_kwargs: dict[str, Any]
) -> Path:
    """Download the asset once into ``cache_dir/models/azureml/...`` (a version's files never change)."""
    from azure.ai.ml import MLClient
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

    where = asset.registry or f"{asset.subscription}/{asset.resource_group}/{asset.workspace}"
    final = cache_dir / "models" / "azureml" / where / asset.name / asset.version
    if final.is_dir():
        return final
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    if asset.registry:
        client = MLClient(credential, registry_name=asset.registry, **client_kwargs)
    else:
        client = MLClient(
            credential, asset.subscription, asset.resource_group, asset.workspace, **client_kwargs
        )
    try:
        with atomic_dir(final, replace=False) as staging:
            client.models.download(name=asset.name, version=asset.version, download_path=str(staging))
            _model_folder(staging, reference, nested=True)  # no config.json: nothing is kept
    except ResourceNotFoundError as error:
        raise UserError(
            f"model {reference!r}: Azure ML has no model {asset.name!r} version {asset.version!r} there."
        ) from error
    except ClientAuthenticationError as error:
        raise UserError(
            f"model {reference!r}: could not authenticate to Azure. DefaultAzureCredential needs a signed-in "
            "identity: `az login`, a managed identity, or AZURE_TENANT_ID/AZURE_CLIENT_ID with a secret."
        ) from error
    except HttpResponseError as error:
        if error.status_code != 403:
            raise
        raise UserError(
            f"model {reference!r}: Azure refused access (403); the signed-in identity needs a role that may "
            "read models there."
        ) from error
    return final


# --- S3 -----------------------------------------------------------------------------------------------


def _download_s3(
    reference: str, cache_dir: Path, storage_options: dict[str, Any], retry: RetryPolicy
) -> Path:
    """Every file under the prefix, keeping its layout, into ``cache_dir/models/s3/<content hash>``."""
    import fsspec

    fs, prefix = fsspec.core.url_to_fs(reference, **storage_options)
    prefix = prefix.rstrip("/")
    fs.invalidate_cache(prefix)  # s3fs may remember an earlier listing of the same prefix
    remote_files = with_retries(lambda: fs.find(prefix), f"listing {reference}", retry)
    if not remote_files:
        raise UserError(f"model {reference!r}: there are no files under this s3:// prefix.")
    parent = cache_dir / "models" / "s3"
    with staging_dir(parent) as staging:
        for remote in remote_files:
            target = staging / (remote[len(prefix) :].lstrip("/") or remote.rsplit("/", 1)[-1])
            target.parent.mkdir(parents=True, exist_ok=True)
            with_retries(
                lambda r=remote, t=target: fs.get_file(r, str(t)), f"downloading s3://{remote}", retry
            )
        # by content: the same files fetched twice land in one folder (False: it is already there)
        final = parent / folder_sha256(staging)
        move_into_place(staging, final, replace=False)
    return final
