"""Model references resolved into local folders, offline, with the real clients: huggingface_hub on a hub
cache laid out in a temporary HF_HOME (a fresh process, so the hub library reads HF_HOME and HF_HUB_OFFLINE
as it does in a run), s3fs on moto's S3 server, and azure-ai-ml's ``MLClient.models.download`` of a
workspace model and of a registry model through test_azure_registry's recording transport (FakeAzure,
extended here with registry discovery, the registry's temporary SAS, and the version, blob-listing and
blob-download answers a download needs). A loopback stand-in for the hub (HF_ENDPOINT) serves a repository
as huggingface_hub fetches it, failing a request once where asked, and refuses a gated repository, a
missing one and an unknown revision with the hub's error headers.

Not covered: anything against a live workspace or registry (the fakes answer what this SDK version asks,
in the JSON shapes its deserializers read; a live service may answer more, or differently), the credential's
token acquisition, and the real hub's answers (no network here).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

from olivepress.errors import UserError
from olivepress.files import folder_sha256
from olivepress.model_source import AzureMLAsset, parse_azureml, reference_kind, resolve_model
from olivepress.retry import RetryPolicy
from tests.olivepress.test_azure_registry import (
    ARM_HOST,
    BLOB_HOST,
    CONTAINER,
    GROUP,
    NAME,
    SAS_SIGNATURE,
    SAS_TOKEN,
    SUBSCRIPTION,
    SYSTEM_DATA,
    TOKEN,
    WORKSPACE,
    WS_PATH,
    FakeAzure,
    FakeCredential,
    _arm_error,
    _json,
    route_sdk_to,
    version_json,
)

FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.2, max_delay_s=2.0, jitter=0.5)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "olivepress-test/tiny-llama"
ROOT = Path(__file__).resolve().parents[2]


# --- Hugging Face ---------------------------------------------------------------------------------------


def hub_cache(hf_home: Path, model_dir: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """``model_dir`` laid out as huggingface_hub caches a download: refs/main → snapshots/<commit>/."""
    storage = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def resolve_in_fresh_process(reference: str, hf_home: Path, tmp_path: Path, **hf_env: str) -> dict:
    """Resolve in a new interpreter with HF_HOME and HF_HUB_OFFLINE=1 (or ``hf_env``) set, as a run's worker
    would have them, retrying transient failures by FAST_RETRY."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from olivepress.errors import UserError\n"
        "from olivepress.model_source import resolve_model\n"
        "from olivepress.retry import RetryPolicy\n"
        "try:\n"
        "    retry = RetryPolicy(**json.loads(sys.argv[3]))\n"
        "    resolved = resolve_model(sys.argv[1], cache_dir=Path(sys.argv[2]), retry=retry)\n"
        "    print(json.dumps(resolved.lineage()))\n"
        "except UserError as error:\n"
        "    print(json.dumps({'user_error': str(error)}))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **hf_env}
    done = subprocess.run(
        [sys.executable, "-c", script, reference, str(tmp_path / "cache"), json.dumps(asdict(FAST_RETRY))],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_hugging_face_id_resolves_from_the_cache_offline(tiny_model_dir, tmp_path):
    snapshot = hub_cache(tmp_path / "hf", tiny_model_dir)
    resolved = resolve_in_fresh_process(REPO, tmp_path / "hf", tmp_path)
    assert resolved == {
        "path": str(snapshot),
        "reference": REPO,
        "kind": "huggingface",
        "revision": COMMIT,
        "content_sha256": folder_sha256(tiny_model_dir),
    }
    pinned = resolve_in_fresh_process(f"{REPO}@{COMMIT}", tmp_path / "hf", tmp_path)
    assert (pinned["path"], pinned["revision"]) == (str(snapshot), COMMIT)


def test_an_unknown_id_offline_is_a_user_error_that_names_it(tiny_model_dir, tmp_path):
    hub_cache(tmp_path / "hf", tiny_model_dir)
    answer = resolve_in_fresh_process("olivepress-test/no-such-model@v2", tmp_path / "hf", tmp_path)
    message = answer["user_error"]
    assert "'olivepress-test/no-such-model@v2'" in message
    assert "not (completely) in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message


SERVED = "olivepress-test/served-llama"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHubHandler(BaseHTTPRequestHandler):
    """The hub as huggingface_hub talks to it: SERVED's ``files`` at COMMIT (revision, tree listing and file
    downloads), and for any other repository a refusal, which huggingface_hub reads from the X-Error-Code
    header. ``fail_once`` maps a method and path prefix to "503" or "drop" (the connection closed unanswered),
    for the first such request. Every request's method, path and Authorization header is recorded."""

    seen: ClassVar[list[tuple[str, str, str | None]]] = []
    files: ClassVar[dict[str, bytes]] = {}
    fail_once: ClassVar[dict[tuple[str, str], str]] = {}

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        path = unquote(urlsplit(self.path).path)
        failing = next(
            (key for key in self.fail_once if key[0] == self.command and path.startswith(key[1])), None
        )
        if failing:
            if self.fail_once.pop(failing) == "503":
                self._send(503, json.dumps({"error": "unavailable"}).encode(), with_body)
            return  # "drop": no answer; the server closes the connection
        if path == f"/api/models/{SERVED}/revision/main":
            siblings = [{"rfilename": name} for name in sorted(self.files)]
            self._send(200, json.dumps({"id": SERVED, "sha": COMMIT, "siblings": siblings}).encode())
        elif path == f"/api/models/{SERVED}/tree/{COMMIT}":
            tree = [
                {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                for name, data in sorted(self.files.items())
            ]
            self._send(200, json.dumps(tree).encode())
        elif path.startswith(f"/{SERVED}/resolve/{COMMIT}/"):
            data = self.files[path.removeprefix(f"/{SERVED}/resolve/{COMMIT}/")]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{git_blob_id(data)}"'}
            self._send(200, data, with_body, "application/octet-stream", headers)
        else:
            if path.startswith("/api/models/olivepress-test/gated"):
                status, code = 403, "GatedRepo"
            elif path.startswith("/api/models/olivepress-test/tiny-llama/revision/"):
                status, code = 404, "RevisionNotFound"
            else:
                status, code = 404, "RepoNotFound"
            self._send(status, json.dumps({"error": code}).encode(), headers={"X-Error-Code": code})

    def _send(
        self,
        status: int,
        body: bytes,
        with_body: bool = True,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    FakeHubHandler.seen, FakeHubHandler.files, FakeHubHandler.fail_once = [], {}, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHubHandler.seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("olivepress-test/gated-model", "is a gated Hugging Face repository"),
        ("olivepress-test/no-such-model", "was not found on the Hugging Face hub"),
        ("olivepress-test/tiny-llama@v9", "revision 'v9' does not exist"),
    ],
)
def test_hub_refusals_are_user_errors_that_say_which(fake_hub, tmp_path, reference, expected):
    endpoint, seen = fake_hub
    answer = resolve_in_fresh_process(
        reference,
        tmp_path / "hf",
        tmp_path,
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=endpoint,
        HF_TOKEN="hf_olivepress_test_token",
        NO_PROXY="127.0.0.1,localhost",
    )
    assert repr(reference) in answer["user_error"] and expected in answer["user_error"]
    assert "hf_olivepress_test_token" not in answer["user_error"]
    asked = [auth for _, path, auth in seen if path.startswith("/api/models/")]
    assert asked == ["Bearer hf_olivepress_test_token"], "HF_TOKEN is sent, and a refusal is not retried"


@pytest.mark.parametrize(
    ("method", "failing", "failure"),
    [
        # failures huggingface_hub passes on unretried (a failed HEAD it turns into "not cached and the hub
        # cannot be reached", a ConnectionError in model_source)
        ("GET", f"/api/models/{SERVED}/tree/", "drop"),
        ("GET", f"/api/models/{SERVED}/tree/", "503"),
        ("GET", f"/{SERVED}/resolve/{COMMIT}/config.json", "503"),
    ],
)
def test_a_transient_hub_failure_is_retried(fake_hub, tiny_model_dir, tmp_path, method, failing, failure):
    endpoint, seen = fake_hub
    FakeHubHandler.files = {
        path.relative_to(tiny_model_dir).as_posix(): path.read_bytes()
        for path in tiny_model_dir.rglob("*")
        if path.is_file()
    }
    FakeHubHandler.fail_once = {(method, failing): failure}
    answer = resolve_in_fresh_process(
        SERVED,
        tmp_path / "hf",
        tmp_path,
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=endpoint,
        NO_PROXY="127.0.0.1,localhost",
    )
    assert not FakeHubHandler.fail_once, "the failure happened"
    assert (answer.get("revision"), answer.get("content_sha256")) == (COMMIT, folder_sha256(tiny_model_dir))
    asked = [path for verb, path, _ in seen if verb == method and unquote(path).startswith(failing)]
    assert len(asked) == 2, "the failed request was made again, once"


def test_the_same_weights_from_two_places_have_the_same_content_hash(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "renamed")
    first = resolve_model(tiny_model_dir, cache_dir=tmp_path / "cache")
    second = resolve_model(str(copy), cache_dir=tmp_path / "cache")
    assert (first.kind, second.kind) == ("local", "local")
    assert first.path == tiny_model_dir.resolve() and second.path == copy.resolve()
    assert first.content_sha256 == second.content_sha256 == folder_sha256(tiny_model_dir)
    assert first.revision is None


def test_reference_kinds():
    assert reference_kind("microsoft/Phi-3.5-mini-instruct") == "huggingface"
    assert reference_kind("microsoft/Phi-3.5-mini-instruct@a1b2c3") == "huggingface"
    assert reference_kind("s3://bucket/models/phi/") == "s3"
    assert reference_kind("azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/4") == "azureml"
    assert reference_kind("./models/phi") == "local"
    assert reference_kind("/abs/models/phi") == "local"


def test_a_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither a local folder nor a Hugging Face id"):
        resolve_model(str(tmp_path / "nowhere" / "deeper"), cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path / "cache")


# --- S3 -------------------------------------------------------------------------------------------------


def s3_options(server) -> dict:
    return {
        "client_kwargs": {"endpoint_url": server.endpoint},
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}, "connect_timeout": 2},
        "skip_instance_cache": True,
    }


def upload(server, bucket: str, prefix: str, folder: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_an_s3_folder_resolves_with_its_nested_layout(s3_server, tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "extra" / "deeper").mkdir(parents=True)
    (model / "extra" / "deeper" / "notes.txt").write_text("nested")
    upload(s3_server, "models-nested", "team/tiny", model)
    resolved = resolve_model(
        "s3://models-nested/team/tiny/",
        cache_dir=tmp_path / "cache",
        storage_options=s3_options(s3_server),
        retry=FAST_RETRY,
    )
    assert resolved.kind == "s3" and resolved.revision is None
    assert resolved.reference == "s3://models-nested/team/tiny/"
    assert (resolved.path / "extra" / "deeper" / "notes.txt").read_text() == "nested"
    assert sorted(p.relative_to(resolved.path) for p in resolved.path.rglob("*")) == sorted(
        p.relative_to(model) for p in model.rglob("*")
    )
    assert resolved.content_sha256 == folder_sha256(model)
    assert resolved.path == tmp_path / "cache" / "models" / "s3" / resolved.content_sha256
    again = resolve_model(
        "s3://models-nested/team/tiny",
        cache_dir=tmp_path / "cache",
        storage_options=s3_options(s3_server),
        retry=FAST_RETRY,
    )
    assert again.path == resolved.path, "the same content lands in the same folder"


def test_an_s3_outage_mid_download_is_retried(s3_server, tiny_model_dir, tmp_path, monkeypatch):
    import s3fs

    upload(s3_server, "models-outage", "tiny", tiny_model_dir)
    original = s3fs.S3FileSystem.get_file
    calls = []

    def get_file_with_outage(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # the first file is down; the server goes away for 1.5 s
            s3_server.stop()
            threading.Timer(1.5, s3_server.start).start()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", get_file_with_outage)
    resolved = resolve_model(
        "s3://models-outage/tiny",
        cache_dir=tmp_path / "cache",
        storage_options=s3_options(s3_server),
        retry=FAST_RETRY,
    )
    files = [p for p in tiny_model_dir.rglob("*") if p.is_file()]
    assert len(calls) > len(files), "a download failed during the outage and was tried again"
    assert resolved.content_sha256 == folder_sha256(tiny_model_dir)


def test_an_empty_s3_prefix_is_a_user_error(s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(
        Bucket="models-empty"
    )
    with pytest.raises(UserError, match=r"'s3://models-empty/nothing/'.*no files"):
        resolve_model(
            "s3://models-empty/nothing/",
            cache_dir=tmp_path / "cache",
            storage_options=s3_options(s3_server),
            retry=FAST_RETRY,
        )


# --- Azure ML -------------------------------------------------------------------------------------------


def test_both_azureml_forms_parse():
    assert parse_azureml("azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/4") == (
        AzureMLAsset("Phi-3.5-mini-instruct", "4", registry="azureml")
    )
    workspace = (
        "azureml://subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg-ml"
        "/workspaces/ws-ml/models/travel-base/versions/12"
    )
    assert parse_azureml(workspace) == AzureMLAsset(
        "travel-base",
        "12",
        subscription="00000000-1111-2222-3333-444444444444",
        resource_group="rg-ml",
        workspace="ws-ml",
    )


@pytest.mark.parametrize(
    "reference",
    [
        "azureml://registries/azureml/models/Phi-3.5-mini-instruct",  # no version
        "azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/",
        "azureml://registries/azureml/models/Phi-3.5-mini-instruct/labels/latest",
        "azureml://subscriptions/s/resourceGroups/rg/models/m/versions/1",  # no workspace
        "azureml://locations/westeurope/workspaces/abc/data/x/versions/1",
        "azureml://registries/azureml/models/../versions/1",  # a name that would climb out of the cache
    ],
)
def test_a_bad_azureml_reference_is_a_user_error_before_any_request(reference, tmp_path):
    with pytest.raises(UserError) as caught:
        resolve_model(reference, cache_dir=tmp_path / "cache", credential=object())
    assert repr(reference) in str(caught.value)
    assert "not an Azure ML model asset id" in str(caught.value)
    assert "azureml://registries/<registry>/models/<name>/versions/<version>" in str(caught.value)


class FakeAzureDownloads(FakeAzure):
    """test_azure_registry's fake ARM and Blob storage, plus what a model download asks for: the model
    version, the container's blob listing (flat, or one level with a delimiter) and each blob's bytes, in
    the storage account ``blob_host`` and its container ``container``."""

    blob_host, container = BLOB_HOST, CONTAINER

    def _answer(self, request):
        if request.host == self.blob_host and request.path == f"/{self.container}":
            return self._listing(request)
        if request.host == self.blob_host and request.method == "HEAD":  # is the prefix a folder blob?
            return self._blob(request, request.path.removeprefix(f"/{self.container}/"))
        if request.host == ARM_HOST and request.method == "GET":
            match = re.fullmatch(rf"{re.escape(WS_PATH)}/models/([^/]+)/versions/([^/]+)", request.path)
            if match:
                found = self.versions.get(match[1], {}).get(match[2])
                return _json(200, found) if found else _arm_error(404, "ResourceNotFound")
        if request.host == self.blob_host and request.method == "GET" and not request.query.get("comp"):
            blob = request.path.removeprefix(f"/{self.container}/")
            if blob not in self.blobs:
                return 404, {"x-ms-error-code": "BlobNotFound"}, b""
            return self._blob_bytes(request, self.blobs[blob])
        return super()._answer(request)

    def _listing(self, request):
        query = {key: values[0] for key, values in request.query.items()}
        if query.get("restype") != "container" or query.get("comp") != "list":
            return self._unexpected(request)
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter")
        blobs, prefixes = [], set()
        for name in sorted(self.blobs):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
            else:
                blobs.append(
                    f"<Blob><Name>{escape(name)}</Name><Properties>"
                    "<Last-Modified>Wed, 01 Jan 2025 00:00:00 GMT</Last-Modified><Etag>0x8DD0000000000001</Etag>"
                    f"<Content-Length>{len(self.blobs[name])}</Content-Length><BlobType>BlockBlob</BlobType>"
                    "</Properties><Metadata /></Blob>"
                )
        listed = "".join(blobs) + "".join(
            f"<BlobPrefix><Name>{escape(p)}</Name></BlobPrefix>" for p in sorted(prefixes)
        )
        body = (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<EnumerationResults ServiceEndpoint="https://{self.blob_host}/" ContainerName="{self.container}">'
            f"<Prefix>{escape(prefix)}</Prefix><Blobs>{listed}</Blobs><NextMarker /></EnumerationResults>"
        )
        return 200, {"Content-Type": "application/xml"}, body.encode()

    @staticmethod
    def _blob_bytes(request, data: bytes):
        headers = {
            "ETag": '"0x8DD0000000000001"',
            "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT",
            "x-ms-blob-type": "BlockBlob",
            "Content-Type": "application/octet-stream",
        }
        wanted = {k.lower(): v for k, v in request.headers.items()}.get("x-ms-range")
        if wanted is None:
            return 200, {**headers, "Content-Length": str(len(data))}, data
        start, end = (int(part) for part in wanted.removeprefix("bytes=").split("-"))
        part = data[start : min(end, len(data) - 1) + 1]
        content_range = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
        return 206, {**headers, "Content-Length": str(len(part)), "Content-Range": content_range}, part


@pytest.fixture
def azure_downloads(monkeypatch):
    """client_kwargs routing azure-ai-ml (ARM and its blob client) to a fresh FakeAzureDownloads."""
    fake = FakeAzureDownloads()
    yield fake, route_sdk_to(fake, monkeypatch)
    assert not fake.unexpected, [(r.method, r.host, r.path) for r in fake.unexpected]


WORKSPACE_REFERENCE = (
    f"azureml://subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/workspaces/{WORKSPACE}"
    f"/models/{NAME}/versions/3"
)


@pytest.mark.filterwarnings("ignore::marshmallow.warnings.Marshmallow4Warning")
def test_a_workspace_model_downloads_through_the_sdk(azure_downloads, tiny_model_dir, tmp_path):
    fake, client_kwargs = azure_downloads
    fake.versions[NAME] = {"3": version_json(NAME, "3", {})}  # its files under LocalUpload/0123/<name>/
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("nested")
    for path in model.rglob("*"):
        if path.is_file():
            fake.blobs[f"LocalUpload/0123/{NAME}/{path.relative_to(model).as_posix()}"] = path.read_bytes()
    credential = FakeCredential()
    resolved = resolve_model(
        WORKSPACE_REFERENCE, cache_dir=tmp_path / "cache", credential=credential, **client_kwargs
    )
    assert (resolved.kind, resolved.revision, resolved.reference) == ("azureml", "3", WORKSPACE_REFERENCE)
    assert resolved.content_sha256 == folder_sha256(model)
    assert (resolved.path / "extra" / "notes.txt").read_text() == "nested"
    cached = tmp_path / "cache" / "models" / "azureml" / SUBSCRIPTION / GROUP / WORKSPACE / NAME / "3"
    assert resolved.path.is_relative_to(cached)
    arm = [(r.method, r.path) for r in fake.requests if r.host == ARM_HOST]
    assert arm == [
        ("GET", f"{WS_PATH}/models/{NAME}/versions/3"),  # the asked-for version: where its files are
        ("GET", f"{WS_PATH}/datastores/workspaceblobstore"),
        ("POST", f"{WS_PATH}/datastores/workspaceblobstore/listSecrets"),  # a SAS for the container
    ]
    blob_requests = [r for r in fake.requests if r.host == BLOB_HOST]
    assert blob_requests and all(r.query.get("sig") for r in blob_requests), "blobs are read with the SAS"
    downloaded = {r.path.removeprefix(f"/{CONTAINER}/") for r in fake.requests if r.method == "GET"}
    assert {f"LocalUpload/0123/{NAME}/extra/notes.txt", f"LocalUpload/0123/{NAME}/config.json"} <= downloaded
    assert all(
        r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in fake.requests if r.host == ARM_HOST
    )

    count = len(fake.requests)
    again = resolve_model(
        WORKSPACE_REFERENCE, cache_dir=tmp_path / "cache", credential=credential, **client_kwargs
    )
    assert again == resolved and len(fake.requests) == count, "a version's files never change: one download"


@pytest.mark.filterwarnings("ignore::marshmallow.warnings.Marshmallow4Warning")
def test_a_missing_azureml_version_is_a_user_error(azure_downloads, tmp_path):
    _, client_kwargs = azure_downloads
    with pytest.raises(UserError) as caught:
        resolve_model(
            WORKSPACE_REFERENCE, cache_dir=tmp_path / "cache", credential=FakeCredential(), **client_kwargs
        )
    assert repr(WORKSPACE_REFERENCE) in str(caught.value) and "no model" in str(caught.value)
    assert not list((tmp_path / "cache").rglob("config.json")), "nothing half-downloaded is kept"


REGISTRY = "olivepress-models"
REGISTRY_SUBSCRIPTION = "55555555-6666-7777-8888-999999999999"
REGISTRY_GROUP = "rg-registry"
DISCOVERY_HOST = "eastus.api.azureml.ms"  # azure-ai-ml's registry discovery endpoint for the public cloud
REGION_HOST = "westeurope.api.azureml.ms"  # the registry's primary region, as discovery answers it
REGISTRY_PATH = (
    f"/mferp/managementfrontend/subscriptions/{REGISTRY_SUBSCRIPTION}/resourceGroups/{REGISTRY_GROUP}"
    f"/providers/Microsoft.MachineLearningServices/registries/{REGISTRY}"
)
REGISTRY_BLOB_HOST = "olivepressmodels0storage.blob.core.windows.net"
REGISTRY_CONTAINER = "registry-models"
REGISTRY_PREFIX = f"{NAME}/4/model"  # where the version's files are, as its modelUri says


class FakeAzureRegistry(FakeAzureDownloads):
    """A registry as azure-ai-ml downloads a model from it: discovery (which subscription, group and region
    hold the registry), the model version from the region's management front end, a SAS URL for its
    container (the "datarefs" call), then the blob listing and bytes from the registry's storage account."""

    blob_host, container = REGISTRY_BLOB_HOST, REGISTRY_CONTAINER

    def _answer(self, request):
        discovery = f"/registrymanagement/v1.0/registries/{REGISTRY}/discovery"
        if (request.method, request.host, request.path) == ("GET", DISCOVERY_HOST, discovery):
            return _json(200, registry_discovery_json())
        if request.host == REGION_HOST and request.path.startswith(REGISTRY_PATH):
            rest = request.path.removeprefix(REGISTRY_PATH)
            match = re.fullmatch(r"/(models|datarefs)/([^/]+)/versions/([^/]+)", rest)
            found = match and self.versions.get(match[2], {}).get(match[3])
            if match and not found:
                return _arm_error(404, "ResourceNotFound")
            if match and match[1] == "models" and request.method == "GET":
                return _json(200, found)
            if match and match[1] == "datarefs" and request.method == "POST":
                return _json(200, blob_reference_json(json.loads(request.body)))
        return super()._answer(request)


def registry_discovery_json() -> dict:
    return {
        "registryName": REGISTRY,
        "tenantId": "22222222-0000-0000-0000-000000000000",
        "primaryRegion": "westeurope",
        "regions": ["westeurope"],
        "subscriptionId": REGISTRY_SUBSCRIPTION,
        "resourceGroup": REGISTRY_GROUP,
        "primaryRegionResourceProviderUri": f"https://{REGION_HOST}/",
    }


def registry_version_json(name: str, version: str) -> dict:
    return {
        "id": f"azureml://registries/{REGISTRY}/models/{name}/versions/{version}",
        "name": version,
        "type": "Microsoft.MachineLearningServices/registries/models/versions",
        "properties": {
            "description": "published to the registry",
            "tags": {},
            "properties": {},
            "flavors": {},
            "isArchived": False,
            "isAnonymous": False,
            "modelType": "custom_model",
            "modelUri": f"https://{REGISTRY_BLOB_HOST}/{REGISTRY_CONTAINER}/{REGISTRY_PREFIX}",
            "provisioningState": "Succeeded",
        },
        "systemData": SYSTEM_DATA,
    }


def blob_reference_json(asked: dict) -> dict:
    """The temporary SAS for the asset's container (the shape azure-ai-ml reads), for the blob it asked for."""
    return {
        "blobReferenceForConsumption": {
            "blobUri": asked["blobUri"],
            "credential": {
                "credentialType": "SAS",
                "sasUri": f"https://{REGISTRY_BLOB_HOST}/{REGISTRY_CONTAINER}?{SAS_TOKEN}",
            },
        }
    }


REGISTRY_REFERENCE = f"azureml://registries/{REGISTRY}/models/{NAME}/versions/4"


@pytest.mark.filterwarnings("ignore::marshmallow.warnings.Marshmallow4Warning")
def test_a_registry_model_downloads_through_the_sdk(monkeypatch, tiny_model_dir, tmp_path):
    fake = FakeAzureRegistry()
    client_kwargs = route_sdk_to(fake, monkeypatch)
    fake.versions[NAME] = {"4": registry_version_json(NAME, "4")}
    for path in tiny_model_dir.rglob("*"):
        if path.is_file():
            fake.blobs[f"{REGISTRY_PREFIX}/{path.relative_to(tiny_model_dir).as_posix()}"] = path.read_bytes()
    fake.blobs[f"{NAME}/3/model/config.json"] = b"{}"  # another version's files: not under its prefix

    resolved = resolve_model(
        REGISTRY_REFERENCE, cache_dir=tmp_path / "cache", credential=FakeCredential(), **client_kwargs
    )
    assert not fake.unexpected, [(r.method, r.host, r.path) for r in fake.unexpected]
    assert (resolved.kind, resolved.revision, resolved.name) == ("azureml", "4", NAME)
    assert resolved.content_sha256 == folder_sha256(tiny_model_dir)
    assert resolved.path.is_relative_to(tmp_path / "cache" / "models" / "azureml" / REGISTRY / NAME / "4")

    management = [(r.method, r.host, r.path) for r in fake.requests if r.host != REGISTRY_BLOB_HOST]
    assert management == [
        ("GET", DISCOVERY_HOST, f"/registrymanagement/v1.0/registries/{REGISTRY}/discovery"),
        ("GET", REGION_HOST, f"{REGISTRY_PATH}/models/{NAME}/versions/4"),
        ("POST", REGION_HOST, f"{REGISTRY_PATH}/datarefs/{NAME}/versions/4"),  # the temporary SAS
    ]
    (dataref,) = [r for r in fake.requests if "/datarefs/" in r.path]
    assert json.loads(dataref.body) == {
        "assetId": f"azureml://registries/{REGISTRY}/models/{NAME}/versions/4",
        "blobUri": f"https://{REGISTRY_BLOB_HOST}/{REGISTRY_CONTAINER}/{REGISTRY_PREFIX}",
    }
    assert all(
        r.headers.get("Authorization") == f"Bearer {TOKEN}"
        for r in fake.requests
        if r.host != REGISTRY_BLOB_HOST
    )
    storage = [r for r in fake.requests if r.host == REGISTRY_BLOB_HOST]
    assert storage and all(r.query.get("sig") == [SAS_SIGNATURE] for r in storage), "read with the SAS only"
    assert not any("Authorization" in r.headers for r in storage)
    listings = [r.query["prefix"][0] for r in storage if r.query.get("comp") == ["list"]]
    assert set(listings) == {f"{REGISTRY_PREFIX}/", REGISTRY_PREFIX}, "a folder? then its files, by prefix"
    read = {r.path.removeprefix(f"/{REGISTRY_CONTAINER}/") for r in storage if not r.query.get("comp")}
    assert f"{REGISTRY_PREFIX}/config.json" in read and f"{NAME}/3/model/config.json" not in read
