"""Model references resolved into local folders, offline, with the real clients: huggingface_hub on a hub
cache laid out in a temporary HF_HOME (a fresh process, so the hub library reads HF_HOME and HF_HUB_OFFLINE
as it does in a run), s3fs on moto's S3 server, and the parsing of Azure ML asset ids.

Not covered here: the Azure ML download itself (``MLClient.models.download``) is not driven through the
recording transport of test_azure_registry.py, and nothing is verified against a live workspace or
registry; nor are a gated or missing repository answered by the real hub (no network here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from olivepress.errors import UserError
from olivepress.files import folder_sha256
from olivepress.model_source import AzureMLAsset, parse_azureml, reference_kind, resolve_model
from olivepress.retry import RetryPolicy

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


def resolve_in_fresh_process(reference: str, hf_home: Path, tmp_path: Path) -> dict:
    """Resolve in a new interpreter with HF_HOME and HF_HUB_OFFLINE=1 set, as a run's worker would have them."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from olivepress.errors import UserError\n"
        "from olivepress.model_source import resolve_model\n"
        "try:\n"
        "    resolved = resolve_model(sys.argv[1], cache_dir=Path(sys.argv[2]))\n"
        "    print(json.dumps(resolved.lineage()))\n"
        "except UserError as error:\n"
        "    print(json.dumps({'user_error': str(error)}))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, reference, str(tmp_path / "cache")],
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
    ],
)
def test_a_bad_azureml_reference_is_a_user_error_before_any_request(reference, tmp_path):
    with pytest.raises(UserError) as caught:
        resolve_model(reference, cache_dir=tmp_path / "cache", credential=object())
    assert repr(reference) in str(caught.value)
    assert "not an Azure ML model asset id" in str(caught.value)
    assert "azureml://registries/<registry>/models/<name>/versions/<version>" in str(caught.value)
