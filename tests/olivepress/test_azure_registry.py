"""The Azure ML backend against what azure-ai-ml really sends, answered in-process.

No Azure stand-in exists, so ``FakeAzure`` plays ARM (workspace, datastore, model versions) and Blob
storage behind the SDK's own HTTP stack: the SDK gets a real azure-core ``RequestsTransport`` whose
``requests`` session routes https to ``FakeAzure`` (a requests transport adapter) instead of the network.
Every request is recorded; responses use the JSON shapes the SDK's deserializers read. The credential is a
static fake (no AAD stand-in exists), so token acquisition itself is not exercised here.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from olivepress.config import AzureMLSettings
from olivepress.errors import UserError
from olivepress.registry import LINEAGE_FILE, Registration, content_sha256
from olivepress.registry.azureml import (
    CONTENT_TAG,
    MAX_VALUE_CHARS,
    lineage_properties,
    lineage_tags,
    list_azureml,
    register_azureml,
)

# azure-ai-ml's schemas warn about marshmallow 4 when first imported: the SDK's business, not these tests'.
pytestmark = pytest.mark.filterwarnings("ignore::marshmallow.warnings.Marshmallow4Warning")

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
GROUP = "rg-olivepress"
WORKSPACE = "ws-olivepress"
SETTINGS = AzureMLSettings(subscription_id=SUBSCRIPTION, resource_group=GROUP, workspace_name=WORKSPACE)
ARM_HOST = "management.azure.com"
ACCOUNT = "wsolivepress0storage"
BLOB_HOST = f"{ACCOUNT}.blob.core.windows.net"
CONTAINER = "azureml-blobstore-6f1c5c1e-0000-4000-8000-000000000001"
WS_PATH = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
DATASTORE_ID = f"{WS_PATH}/datastores/workspaceblobstore"
TOKEN = "secret-token-4b1d7e0c9a"
SAS_SIGNATURE = "c2VjcmV0LXNhcy1zaWduYXR1cmU="
SAS_TOKEN = f"sv=2021-08-06&se=2030-01-01T00%3A00%3A00Z&sr=c&sp=racwl&sig={SAS_SIGNATURE.replace('=', '%3D')}"
NAME = "smollm2-olivepress"
SYSTEM_DATA = {
    "createdAt": "2025-01-01T00:00:00.000Z",
    "createdBy": "someone@example.com",
    "createdByType": "User",
    "lastModifiedAt": "2025-01-01T00:00:00.000Z",
}


class FakeCredential:
    """A TokenCredential that hands out one static token and remembers the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(TOKEN, int(time.time()) + 3600)


@dataclass
class Recorded:
    method: str
    host: str
    path: str  # unquoted
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class FakeAzure(BaseAdapter):
    """ARM and Blob storage as azure-ai-ml 1.35.2 uses them to register a local folder as a model.

    ``versions`` holds the workspace's model versions as ARM JSON, ``blobs`` the container's blobs.
    A request it has no route for is recorded in ``unexpected`` and answered 400, so it cannot pass unseen.
    """

    def __init__(self, *, datastore_auth: str = "AccountKey", workspace_exists: bool = True) -> None:
        super().__init__()
        self.datastore_auth = datastore_auth  # "AccountKey": the SDK fetches a SAS; "None": identity-based
        self.workspace_exists = workspace_exists
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}  # (method, path regex) -> (status, error code)
        self.requests: list[Recorded] = []
        self.unexpected: list[Recorded] = []
        self.versions: dict[str, dict[str, dict]] = {}  # model name -> version -> ModelVersion JSON
        self.blobs: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()  # the SDK uploads a folder's files from a thread pool

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        url = urlsplit(request.url)
        body = request.body
        if hasattr(body, "read"):
            body = body.read()
        elif body is not None and not isinstance(body, bytes | str):
            body = b"".join(body)
        recorded = Recorded(
            request.method,
            url.hostname,
            unquote(url.path),
            parse_qs(url.query),
            dict(request.headers),
            body.encode() if isinstance(body, str) else body or b"",
        )
        with self.lock:
            self.requests.append(recorded)
            status, headers, payload = self._answer(recorded)
        response = requests.Response()
        response.status_code = status
        response.headers = CaseInsensitiveDict(
            {"x-ms-request-id": "00000000-0000-0000-0000-00000000abcd", **headers}
        )
        response.raw = io.BytesIO(payload)
        response.url = request.url
        response.request = request
        return response

    def close(self) -> None:
        pass

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in order."""
        return [(r.method, r.path) for r in self.requests]

    def _answer(self, request: Recorded) -> tuple[int, dict[str, str], bytes]:
        for (method, pattern), (status, code) in self.fail.items():
            if request.method == method and re.fullmatch(pattern, request.path):
                return _arm_error(status, code)
        if request.host == ARM_HOST:
            return self._arm(request)
        if request.host == BLOB_HOST and request.path.startswith(f"/{CONTAINER}/"):
            return self._blob(request, request.path.removeprefix(f"/{CONTAINER}/"))
        return self._unexpected(request)

    def _arm(self, request: Recorded) -> tuple[int, dict[str, str], bytes]:
        if not request.path.startswith(WS_PATH) or not self.workspace_exists:
            return _arm_error(404, "ResourceNotFound")
        rest = request.path.removeprefix(WS_PATH)
        method = request.method
        if method == "GET" and rest == "":
            return _json(200, workspace_json())
        if method == "GET" and rest == "/datastores/workspaceblobstore":
            return _json(200, datastore_json(self.datastore_auth))
        if method == "POST" and rest == "/datastores/workspaceblobstore/listSecrets":
            return _json(200, {"secretsType": "Sas", "sasToken": SAS_TOKEN})
        if method == "GET" and rest == "/models":
            return _json(
                200, {"value": [container_json(name, v) for name, v in sorted(self.versions.items())]}
            )
        if (match := re.fullmatch(r"/models/([^/]+)/versions", rest)) and method == "GET":
            versions = self.versions.get(match[1])
            if not versions:  # no such model yet
                return _arm_error(404, "ResourceNotFound")
            listed = sorted(versions.values(), key=lambda v: v["systemData"]["createdAt"], reverse=True)
            if "$top" in request.query:
                listed = listed[: int(request.query["$top"][0])]
            return _json(200, {"value": listed})
        if (match := re.fullmatch(r"/models/([^/]+)/versions/([^/]+)", rest)) and method == "PUT":
            name, version = match[1], match[2]
            sent = json.loads(request.body)
            created = {
                "id": f"{WS_PATH}/models/{name}/versions/{version}",
                "name": version,
                "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
                "properties": {"flavors": {}, "provisioningState": "Succeeded", **sent["properties"]},
                "systemData": {**SYSTEM_DATA, "createdAt": "2030-01-01T00:00:00.000Z"},
            }
            self.versions.setdefault(name, {})[version] = created
            return _json(201, created)
        return self._unexpected(request)

    def _blob(self, request: Recorded, blob: str) -> tuple[int, dict[str, str], bytes]:
        stamp = {"ETag": '"0x8DD0000000000001"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}
        comp = request.query.get("comp", [None])[0]
        if request.method == "HEAD" and comp is None:
            if blob not in self.blobs:
                return 404, {"x-ms-error-code": "BlobNotFound"}, b""
            meta = {f"x-ms-meta-{k}": v for k, v in self.metadata.get(blob, {}).items()}
            length = str(len(self.blobs[blob]))
            return 200, {**stamp, "Content-Length": length, "x-ms-blob-type": "BlockBlob", **meta}, b""
        if request.method == "PUT" and comp is None:
            if request.headers.get("x-ms-blob-type") != "BlockBlob":
                return self._unexpected(request)
            if request.headers.get("If-None-Match") == "*" and blob in self.blobs:
                return 409, {"x-ms-error-code": "BlobAlreadyExists"}, b""
            md5 = base64.b64encode(hashlib.md5(request.body).digest()).decode()
            if request.headers.get("Content-MD5", md5) != md5:  # the service checks it too
                return 400, {"x-ms-error-code": "Md5Mismatch"}, b""
            self.blobs[blob] = request.body
            return 201, {**stamp, "Content-MD5": md5, "x-ms-request-server-encrypted": "true"}, b""
        if request.method == "PUT" and comp == "metadata" and blob in self.blobs:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.metadata[blob] = {
                k[len("x-ms-meta-") :]: v for k, v in headers.items() if k.startswith("x-ms-meta-")
            }
            return 200, stamp, b""
        return self._unexpected(request)

    def _unexpected(self, request: Recorded) -> tuple[int, dict[str, str], bytes]:
        self.unexpected.append(request)
        return _arm_error(400, "UnexpectedRequest")


def _json(status: int, payload: dict) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(payload).encode()


def _arm_error(status: int, code: str) -> tuple[int, dict[str, str], bytes]:
    status_, headers, body = _json(status, {"error": {"code": code, "message": f"{code} (fake Azure)"}})
    return status_, {**headers, "x-ms-error-code": code}, body


def workspace_json() -> dict:
    """A workspace as ARM returns it (Workspace._from_rest_object reads these fields)."""
    return {
        "id": WS_PATH,
        "name": WORKSPACE,
        "type": "Microsoft.MachineLearningServices/workspaces",
        "location": "westeurope",
        "kind": "Default",
        "sku": {"name": "Basic", "tier": "Basic"},
        "identity": {"type": "SystemAssigned", "principalId": "11111111-0000-0000-0000-000000000000"},
        "properties": {
            "workspaceId": "6f1c5c1e-0000-4000-8000-000000000001",
            "friendlyName": WORKSPACE,
            "storageAccount": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
            "discoveryUrl": "https://westeurope.api.azureml.ms/discovery",
            "mlFlowTrackingUri": f"azureml://westeurope.api.azureml.ms/mlflow/v1.0{WS_PATH}",
            "provisioningState": "Succeeded",
            "publicNetworkAccess": "Enabled",
            "hbiWorkspace": False,
            "v1LegacyMode": False,
        },
        "systemData": SYSTEM_DATA,
    }


def datastore_json(auth: str) -> dict:
    """The workspace's default blob datastore; ``auth`` is its credentialsType (AccountKey or None)."""
    return {
        "id": DATASTORE_ID,
        "name": "workspaceblobstore",
        "type": "Microsoft.MachineLearningServices/workspaces/datastores",
        "properties": {
            "datastoreType": "AzureBlob",
            "accountName": ACCOUNT,
            "containerName": CONTAINER,
            "endpoint": "core.windows.net",
            "protocol": "https",
            "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity",
            "credentials": {"credentialsType": auth},
            "isDefault": True,
            "tags": {},
            "properties": {},
        },
        "systemData": SYSTEM_DATA,
    }


def container_json(name: str, versions: dict[str, dict]) -> dict:
    return {
        "id": f"{WS_PATH}/models/{name}",
        "name": name,
        "type": "Microsoft.MachineLearningServices/workspaces/models",
        "properties": {
            "latestVersion": max(versions, key=int),
            "isArchived": False,
            "tags": {},
            "properties": {},
        },
        "systemData": SYSTEM_DATA,
    }


def version_json(name: str, version: str, tags: dict[str, str]) -> dict:
    """A version registered earlier, as the version listing returns it."""
    return {
        "id": f"{WS_PATH}/models/{name}/versions/{version}",
        "name": version,
        "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
        "properties": {
            "description": "registered earlier",
            "tags": tags,
            "properties": {},
            "flavors": {},
            "isArchived": False,
            "isAnonymous": False,
            "modelType": "custom_model",
            "modelUri": f"azureml://subscriptions/{SUBSCRIPTION}/resourcegroups/{GROUP}/workspaces/{WORKSPACE}"
            f"/datastores/workspaceblobstore/paths/LocalUpload/0123/{name}",
            "provisioningState": "Succeeded",
        },
        "systemData": {**SYSTEM_DATA, "createdAt": f"2025-0{min(int(version), 9)}-01T00:00:00Z"},
    }


def route_sdk_to(fake: requests.adapters.BaseAdapter, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """client_kwargs that send azure-ai-ml's ARM and blob requests to ``fake`` (a requests adapter)."""
    import azure.ai.ml._artifacts._blob_storage_helper as blob_helper
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobServiceClient, ContainerClient

    session = requests.Session()
    session.trust_env = False  # no proxy or .netrc from the environment
    session.mount("https://", fake)
    session.mount("http://", fake)
    transport = RequestsTransport(session=session)
    # MLClient passes its kwargs (transport, retry_total) to its ARM clients, but the SDK's blob helper
    # builds BlobServiceClient(account_url, credential), or for a registry asset's SAS URL
    # ContainerClient.from_container_url(url), with no way to pass them, so its storage pipeline would open
    # real connections. Patched here only: the same classes, given the storage SDK's own documented
    # ``transport`` and ``retry_total`` keywords.
    storage_kwargs = {"transport": transport, "retry_total": 0}
    monkeypatch.setattr(
        blob_helper, "BlobServiceClient", functools.partial(BlobServiceClient, **storage_kwargs)
    )

    class RoutedContainerClient(ContainerClient):
        @classmethod
        def from_container_url(cls, container_url, credential=None, **kwargs):
            return ContainerClient.from_container_url(container_url, credential, **storage_kwargs, **kwargs)

    monkeypatch.setattr(blob_helper, "ContainerClient", RoutedContainerClient)
    monkeypatch.delenv("AZUREML_CURRENT_CLOUD", raising=False)  # MLClient sets it; undone after the test
    return {"transport": transport, "retry_total": 0}


@pytest.fixture
def azure(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """client_kwargs that route the SDK to a fresh FakeAzure, and the fake itself."""
    fake = FakeAzure()
    yield {"fake": fake, "kwargs": route_sdk_to(fake, monkeypatch)}
    assert not fake.unexpected, [(r.method, r.host, r.path) for r in fake.unexpected]


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    model, report = tmp_path / "src" / "model", tmp_path / "src" / "report"
    (model / "adapters").mkdir(parents=True)
    report.mkdir(parents=True)
    (model / "model.onnx").write_bytes(bytes(range(256)) * 4)
    (model / "genai_config.json").write_text('{"model": {"type": "llama"}}', encoding="utf-8")
    (model / "adapters" / "travel.onnx_adapter").write_bytes(b"\x00adapter\xff" * 10)
    (report / "report.md").write_text("# report\n\ngate PASSED\n", encoding="utf-8")
    return {"model": model, "report": report}


def raw_metrics(variant: str, perplexity: float, rouge_l: float, speed: float, size: int) -> dict[str, Any]:
    return {
        "variant": variant,
        "loss": math.log(perplexity),
        "perplexity": perplexity,
        "rouge_l": rouge_l,
        "decode_tokens_per_s": speed,
        "time_to_first_token_s": 0.01234567,
        "bytes_on_disk": size,
        "peak_memory_mib": 41.2345678,
        "generated_tokens": 1024,
        "gpu_memory_mib": None,
    }


def make_lineage(sources: dict[str, Path]) -> dict[str, Any]:
    return {
        "content_sha256": content_sha256(sources),
        "base_model": "/models/SmolLM2-135M-Instruct",
        "data": {"path": "/data/travel.jsonl", "sha256": "d" * 64},
        "config": {"seed": 0, "finetune": {"max_steps": 60, "lora_r": 16}, "text_template": "x" * 2000},
        # raw, as build_lineage stores them (VariantMetrics as a dict): the tags round them
        "metrics": [
            raw_metrics("base", 12.5012345, 0.2100004, 80.0412345, 540_123_456),
            raw_metrics("finetuned", 9.7512345, 0.4199996, 95.5487654, 120_412_345),
        ],
        "gate": {
            "passed": True,
            "checks": [
                {
                    "name": "size_ratio",
                    "description": "fine-tuned model + adapter bytes / base; at most the limit",
                    "measured": 0.22294374318137,
                    "limit": 0.5,
                    "passed": True,
                }
            ],
        },
        "library_versions": {"olivepress": "0.1.0"},
        "flow_run_id": "run-123",
        "registered_at": "2025-06-01T00:00:00+00:00",
    }


def entry_files(sources: dict[str, Path], lineage: dict[str, Any]) -> dict[str, bytes]:
    """What the entry folder holds, by path relative to it."""
    files = {
        f"{key}/{path.relative_to(folder).as_posix()}": path.read_bytes()
        for key, folder in sources.items()
        for path in folder.rglob("*")
        if path.is_file()
    }
    files[LINEAGE_FILE] = json.dumps(lineage, indent=1, sort_keys=True).encode()
    return files


def model_puts(fake: FakeAzure) -> list[Recorded]:
    return [r for r in fake.requests if r.host == ARM_HOST and r.method == "PUT"]


@pytest.mark.parametrize("datastore_auth", ["AccountKey", "None"])
def test_registration_uploads_every_file_and_creates_a_custom_model_version(azure, sources, datastore_auth):
    fake: FakeAzure = azure["fake"]
    fake.datastore_auth = datastore_auth
    lineage = make_lineage(sources)
    credential = FakeCredential()

    registration = register_azureml(
        SETTINGS, NAME, sources, lineage, credential=credential, **azure["kwargs"]
    )

    version_id = f"{WS_PATH}/models/{NAME}/versions/1"
    assert registration == Registration("azureml", NAME, "1", version_id, reused=False)

    # The ARM calls, in order. The SDK itself asks for the latest version (evaluator check) before uploading.
    arm = [(m, p.removeprefix(WS_PATH)) for m, p in fake.calls() if not p.startswith(f"/{CONTAINER}/")]
    secrets = (
        [("POST", "/datastores/workspaceblobstore/listSecrets")] if datastore_auth == "AccountKey" else []
    )
    assert arm == [
        ("GET", ""),  # workspace
        ("GET", f"/models/{NAME}/versions"),  # ours: all versions, archived included
        ("GET", f"/models/{NAME}/versions"),  # the SDK's: latest version ($top=1)
        ("GET", "/datastores/workspaceblobstore"),
        *secrets,
        ("PUT", f"/models/{NAME}/versions/1"),
    ]
    listing = fake.requests[1]
    assert listing.query["listViewType"] == ["All"]
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in fake.requests if r.host == ARM_HOST)

    # Every file of the entry went up, byte for byte, under LocalUpload/<hash>/<name>/, nothing else.
    expected = entry_files(sources, lineage)
    prefixes = {blob.split(f"/{NAME}/")[0] for blob in fake.blobs}
    assert len(prefixes) == 1 and re.fullmatch(r"LocalUpload/[0-9a-f]{64}", prefixes.pop())
    assert {blob.split(f"/{NAME}/", 1)[1]: data for blob, data in fake.blobs.items()} == expected
    blob_requests = [r for r in fake.requests if r.host == BLOB_HOST]
    assert sorted(r.method for r in blob_requests) == ["HEAD"] + ["PUT"] * (len(expected) + 1)
    (indicator,) = fake.metadata  # the first file carries the SDK's upload-confirmation metadata
    assert fake.metadata[indicator] == {"upload_status": "completed", "name": NAME, "version": "1"}
    if datastore_auth == "AccountKey":  # a SAS from listSecrets signs the blob requests
        assert all(
            r.query["sig"] == [SAS_SIGNATURE] and "Authorization" not in r.headers for r in blob_requests
        )
    else:  # identity-based datastore: the caller's own token, for the storage audience
        assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in blob_requests)
        assert ("https://storage.azure.com/.default",) in credential.scopes

    (put,) = model_puts(fake)
    sent = json.loads(put.body)["properties"]
    assert sent["modelType"] == "custom_model"
    upload_root = next(iter(fake.blobs)).split(f"/{NAME}/")[0]
    assert sent["modelUri"] == (
        f"azureml://subscriptions/{SUBSCRIPTION}/resourcegroups/{GROUP}/workspaces/{WORKSPACE}"
        f"/datastores/workspaceblobstore/paths/{upload_root}/{NAME}"
    )
    assert sent["tags"] == {
        CONTENT_TAG: lineage["content_sha256"],
        "olivepress.data_sha256": "d" * 64,
        "olivepress.flow_run_id": "run-123",
        "olivepress.gate": "passed",
        "olivepress.base.perplexity": "12.5",
        "olivepress.base.rouge_l": "0.21",
        "olivepress.base.decode_tok_s": "80.0",
        "olivepress.base.size_mb": "540.1",
        "olivepress.finetuned.perplexity": "9.75",
        "olivepress.finetuned.rouge_l": "0.42",
        "olivepress.finetuned.decode_tok_s": "95.5",
        "olivepress.finetuned.size_mb": "120.4",
    }
    properties = sent["properties"]
    assert properties["olivepress.config.finetune"] == '{"lora_r":16,"max_steps":60}'
    # properties keep the raw record: each variant's metrics unrounded, the gate's checks
    assert [json.loads(properties[f"olivepress.metrics.{variant}"]) for variant in ("base", "finetuned")] == (
        lineage["metrics"]
    )
    assert json.loads(properties["olivepress.gate"]) == lineage["gate"]
    assert properties["olivepress.flow_run_id"] == "run-123"
    assert "see lineage.json" in properties["olivepress.config.text_template"]  # 2,000 characters: too long
    for values in (sent["tags"], properties):
        assert all(isinstance(v, str) and len(v) <= MAX_VALUE_CHARS for v in values.values())


def test_properties_keep_each_variants_raw_metrics_whole(sources):
    """Three variants' unrounded metrics together come close to the 1,000-character limit (a 7B model on a
    GPU: 10 digits of bytes, 17 of every float); one property each leaves room."""
    lineage = make_lineage(sources)
    lineage["metrics"] = [
        raw_metrics(variant, 12.345678901234567, 0.2345678901234567, 1234.5678901234567, 14_212_345_678)
        | {
            "gpu_memory_mib": 15123.456789012345,
            "peak_memory_mib": 1412.3456789012345,
            "time_to_first_token_s": 0.012345678901234567,
            "generated_tokens": 10240,
        }
        for variant in ("base", "quantized", "fine-tuned")
    ]
    assert len(json.dumps(lineage["metrics"], separators=(",", ":"))) > 0.9 * MAX_VALUE_CHARS
    properties = lineage_properties(lineage)
    for row in lineage["metrics"]:
        assert json.loads(properties[f"olivepress.metrics.{row['variant']}"]) == row
    assert lineage_tags(lineage)["olivepress.fine-tuned.perplexity"] == "12.35"


def test_same_content_again_returns_the_existing_version_without_uploading(azure, sources):
    fake: FakeAzure = azure["fake"]
    lineage = make_lineage(sources)
    fake.versions[NAME] = {
        "1": version_json(NAME, "1", {CONTENT_TAG: "0" * 64}),
        "2": version_json(NAME, "2", {CONTENT_TAG: lineage["content_sha256"]}),
    }

    registration = register_azureml(
        SETTINGS, NAME, sources, lineage, credential=FakeCredential(), **azure["kwargs"]
    )

    assert registration == Registration(
        "azureml", NAME, "2", f"{WS_PATH}/models/{NAME}/versions/2", reused=True
    )
    assert fake.calls() == [("GET", WS_PATH), ("GET", f"{WS_PATH}/models/{NAME}/versions")]
    assert not fake.blobs and not model_puts(fake)


def test_new_content_becomes_the_version_after_the_highest(azure, sources):
    fake: FakeAzure = azure["fake"]
    fake.versions[NAME] = {v: version_json(NAME, v, {CONTENT_TAG: v * 64}) for v in ("3", "1")}

    registration = register_azureml(
        SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
    )

    assert (registration.version, registration.reused) == ("4", False)
    (put,) = model_puts(fake)
    assert put.path == f"{WS_PATH}/models/{NAME}/versions/4"
    assert {blob.split(f"/{NAME}/", 1)[1] for blob in fake.blobs} == set(
        entry_files(sources, make_lineage(sources))
    )


def test_token_and_sas_stay_in_the_auth_headers_only(azure, sources, caplog):
    fake: FakeAzure = azure["fake"]
    caplog.set_level(logging.DEBUG)

    register_azureml(
        SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
    )

    assert fake.blobs and model_puts(fake)
    for request in fake.requests:
        others = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        assert TOKEN.encode() not in request.body
        assert TOKEN not in json.dumps(others) + request.path + json.dumps(request.query)
    (lineage_blob,) = [data for blob, data in fake.blobs.items() if blob.endswith(f"/{LINEAGE_FILE}")]
    assert TOKEN.encode() not in lineage_blob and SAS_SIGNATURE.encode() not in lineage_blob
    sent = json.loads(model_puts(fake)[0].body)["properties"]
    assert TOKEN not in json.dumps(sent) and SAS_SIGNATURE not in json.dumps(sent)
    assert any(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in fake.requests)
    assert caplog.records  # the SDK did log its requests, at DEBUG and INFO
    assert TOKEN not in caplog.text and SAS_SIGNATURE not in caplog.text


def test_missing_workspace_is_a_user_error_naming_the_config(azure, sources):
    fake: FakeAzure = azure["fake"]
    fake.workspace_exists = False

    with pytest.raises(
        UserError, match=r"registry\.azureml: workspace 'ws-olivepress' was not found"
    ) as info:
        register_azureml(
            SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
        )

    assert "resource_group" in str(info.value) and TOKEN not in str(info.value)
    assert fake.calls() == [("GET", WS_PATH)]


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (401, "InvalidAuthenticationToken", "could not authenticate to Azure"),
        (403, "AuthorizationFailed", "Azure refused access to workspace 'ws-olivepress'"),
    ],
)
def test_refused_access_is_a_user_error(azure, sources, status, code, message):
    fake: FakeAzure = azure["fake"]
    fake.fail[("GET", re.escape(WS_PATH))] = (status, code)

    with pytest.raises(UserError, match=rf"registry\.azureml: {message} \({status} {code}\)"):
        register_azureml(
            SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
        )
    assert fake.calls() == [("GET", WS_PATH)]


def test_no_write_access_to_the_datastore_is_a_user_error(azure, sources):
    fake: FakeAzure = azure["fake"]
    fake.fail[("HEAD", rf"/{CONTAINER}/.*")] = (403, "AuthorizationPermissionMismatch")

    with pytest.raises(UserError, match=r"registry\.azureml: Azure ML refused the model.*Storage Blob Data"):
        register_azureml(
            SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
        )
    assert not fake.blobs and not model_puts(fake)


def test_no_usable_credential_is_a_user_error(azure, sources):
    from azure.identity import CredentialUnavailableError

    class NoCredential:
        def get_token(self, *scopes: str, **kwargs: Any):
            raise CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token")

    with pytest.raises(UserError, match=r"registry\.azureml: could not authenticate.*az login"):
        register_azureml(
            SETTINGS, NAME, sources, make_lineage(sources), credential=NoCredential(), **azure["kwargs"]
        )
    assert not azure["fake"].requests  # the token is fetched before the first request is sent


def test_throttling_propagates_for_the_task_retry(azure, sources):
    from azure.core.exceptions import HttpResponseError

    fake: FakeAzure = azure["fake"]
    fake.fail[("PUT", re.escape(f"{WS_PATH}/models/{NAME}/versions/1"))] = (429, "TooManyRequests")

    with pytest.raises(HttpResponseError) as info:
        register_azureml(
            SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
        )

    assert not isinstance(info.value, UserError) and info.value.status_code == 429
    assert len(model_puts(fake)) == 1  # retry_total=0: the SDK did not retry on its own


def test_failed_blob_upload_raises_instead_of_hanging(azure, sources):
    fake: FakeAzure = azure["fake"]
    fake.fail[("PUT", rf"/{CONTAINER}/.*/report\.md")] = (503, "ServerBusy")
    outcome: list[BaseException] = []

    def register() -> None:
        try:
            register_azureml(
                SETTINGS, NAME, sources, make_lineage(sources), credential=FakeCredential(), **azure["kwargs"]
            )
        except Exception as error:
            outcome.append(error)

    worker = threading.Thread(target=register, daemon=True)
    worker.start()
    worker.join(timeout=20)

    assert not worker.is_alive(), "the SDK waits forever for an upload that failed"
    (error,) = outcome
    assert getattr(error, "status_code", None) == 503 and not isinstance(error, UserError)
    assert not model_puts(fake)


def test_listing_shows_only_versions_olivepress_registered(azure):
    fake: FakeAzure = azure["fake"]
    fake.versions = {
        NAME: {
            "1": version_json(NAME, "1", {CONTENT_TAG: "a" * 64, "olivepress.gate": "passed"}),
            "2": version_json(NAME, "2", {CONTENT_TAG: "b" * 64}),
        },
        "someone-elses-model": {"7": version_json("someone-elses-model", "7", {"team": "x"})},
    }

    rows = list_azureml(SETTINGS, credential=FakeCredential(), **azure["kwargs"])

    assert rows == [
        {"name": NAME, "version": "1", "tags": {CONTENT_TAG: "a" * 64, "olivepress.gate": "passed"}},
        {"name": NAME, "version": "2", "tags": {CONTENT_TAG: "b" * 64}},
    ]


def targets_lineage(parts: dict[str, Path]) -> dict[str, Any]:
    """The lineage of a run of two datasets on two targets: cooking passed on both, travel on cpu only (its
    cuda export failed before a gate); the top-level metrics and gate are cooking's on cpu."""

    def measured(perplexity: float, rouge_l: float | None = 0.3) -> dict[str, Any]:
        return {
            "metrics": [
                raw_metrics("base", 12.5, 0.21, 80.0, 540_123_456),
                raw_metrics("fine-tuned", perplexity, rouge_l, 95.0, 120_412_345),
            ],
            "gate": {"passed": True, "checks": []},
        }

    def passed(name: str, target: str, perplexity: float) -> dict[str, Any]:
        file = {"file": f"adapters/{target}/{name}.onnx_adapter", "sha256": "a" * 64}
        return file | measured(perplexity)

    lineage = make_lineage(parts)
    lineage["targets"] = {"cpu": measured(7.25), "cuda": measured(7.5, rouge_l=None)}
    lineage["metrics"], lineage["gate"] = (
        lineage["targets"]["cpu"]["metrics"],
        lineage["targets"]["cpu"]["gate"],
    )
    lineage["adapters"] = {
        "cooking": {
            "data": {"path": "/data/cooking.jsonl", "sha256": "e" * 64},
            "train_pairs": 20,
            "held_out_pairs": 5,
            "targets": {"cpu": passed("cooking", "cpu", 7.25), "cuda": passed("cooking", "cuda", 7.5)},
        },
        "travel": {
            "data": {"path": "/data/travel.jsonl", "sha256": "f" * 64},
            "train_pairs": 20,
            "held_out_pairs": 5,
            "targets": {
                "cpu": passed("travel", "cpu", 9.5),
                "cuda": {"failure": "the cuda export failed: out of memory"},
            },
        },
    }
    return lineage


def test_tags_name_the_targets_and_each_targets_and_adapters_verdict(tmp_path):
    tags = lineage_tags(targets_lineage({"model": tmp_path}))
    assert tags["olivepress.targets"] == "cpu,cuda"
    assert tags["olivepress.adapters"] == "cooking,travel"
    # the top-level summary stays: the first passing adapter on its first passing target
    assert (tags["olivepress.gate"], tags["olivepress.fine-tuned.perplexity"]) == ("passed", "7.25")
    assert tags["olivepress.target.cpu.gate"] == tags["olivepress.target.cuda.gate"] == "passed"
    assert tags["olivepress.target.cuda.perplexity"] == "7.5"
    assert "olivepress.target.cuda.rouge_l" not in tags, "no free answers measured: no tag"
    assert tags["olivepress.adapter.travel.cpu.perplexity"] == "9.5"
    assert tags["olivepress.adapter.travel.cpu.gate"] == "passed"
    assert tags["olivepress.adapter.travel.cuda.gate"] == "failed"
    assert not any(key.startswith("olivepress.adapter.travel.cuda.") and "gate" not in key for key in tags)
    assert all(isinstance(v, str) and len(v) <= MAX_VALUE_CHARS for v in tags.values())


def test_an_entry_with_several_targets_and_adapters_uploads_each_and_describes_each(azure, sources, tmp_path):
    """A run of datasets × targets: model/<target>/ and adapters/<target>/ go up with report/, and each
    target and each adapter on each target gets its own tags (gate, fine-tuned metrics) and properties
    (record, gate, raw metrics)."""
    fake: FakeAzure = azure["fake"]
    model, adapters = tmp_path / "src" / "entry-model", tmp_path / "src" / "adapters"
    for target in ("cpu", "cuda"):
        shutil.copytree(sources["model"], model / target, ignore=shutil.ignore_patterns("adapters"))
        (adapters / target).mkdir(parents=True)
        for name in ("cooking", "travel")[: 2 if target == "cpu" else 1]:
            (adapters / target / f"{name}.onnx_adapter").write_bytes(f"{name} {target}".encode() * 50)
    parts = {"model": model, "report": sources["report"], "adapters": adapters}
    lineage = targets_lineage(parts)

    registration = register_azureml(
        SETTINGS, NAME, parts, lineage, credential=FakeCredential(), **azure["kwargs"]
    )

    assert registration.version == "1"
    uploaded = {blob.split(f"/{NAME}/", 1)[1]: data for blob, data in fake.blobs.items()}
    assert uploaded == entry_files(parts, lineage)
    assert uploaded["adapters/cuda/cooking.onnx_adapter"] == b"cooking cuda" * 50
    assert "model/cuda/genai_config.json" in uploaded
    (put,) = model_puts(fake)
    sent = json.loads(put.body)["properties"]
    assert sent["tags"]["olivepress.targets"] == "cpu,cuda"
    assert sent["tags"]["olivepress.adapters"] == "cooking,travel"
    assert sent["tags"]["olivepress.adapter.cooking.cuda.perplexity"] == "7.5"
    assert sent["tags"]["olivepress.adapter.travel.cpu.gate"] == "passed"
    assert sent["tags"]["olivepress.adapter.travel.cuda.gate"] == "failed"
    properties = sent["properties"]
    assert json.loads(properties["olivepress.adapter.cooking"])["data"]["path"] == "/data/cooking.jsonl"
    assert json.loads(properties["olivepress.adapter.travel.cpu"]) == {
        "file": "adapters/cpu/travel.onnx_adapter",
        "sha256": "a" * 64,
    }
    assert json.loads(properties["olivepress.adapter.travel.cpu.metrics.fine-tuned"])["perplexity"] == 9.5
    assert json.loads(properties["olivepress.adapter.travel.cpu.gate"]) == {"passed": True, "checks": []}
    assert json.loads(properties["olivepress.adapter.travel.cuda"]) == {
        "failure": "the cuda export failed: out of memory"
    }
    assert json.loads(properties["olivepress.target.cuda.metrics.fine-tuned"])["rouge_l"] is None
    assert json.loads(properties["olivepress.target.cpu.gate"]) == {"passed": True, "checks": []}
    assert "olivepress.adapters" not in properties and "olivepress.targets" not in properties
    for values in (sent["tags"], properties):
        assert all(isinstance(v, str) and len(v) <= MAX_VALUE_CHARS for v in values.values())
