"""The `s3` storage driver through the real daemon, against moto's S3 API on loopback.

moto runs as a real HTTP server on 127.0.0.1 in a thread of the test process (its
werkzeug app, nothing patched); the daemon and the CLI are subprocesses that talk to
it with aiobotocore, and the tests look at the bucket with boto3. Ambient AWS
credentials are removed from the environment, so every request is signed with the
credentials a test hands over: a credentials file named in the config, or
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` in the daemon's environment only.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from conftest import Root, wait_until
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from test_retention import expire_now
from werkzeug.serving import make_server

from archived.drivers.base import known_digest
from archived.drivers.s3 import S3Driver, S3Options, is_recoverable
from archived.errors import StorageError

KEY_ID, SECRET = "AKIAARCHIVEDTEST0001", "archived/test/secret/key/0000000000000000"
MiB = 1024 * 1024


class S3Server:
    """moto's S3 API over HTTP on 127.0.0.1; its buckets live in this process, so a
    server started again on the same port (or another one) still has them."""

    def __init__(self, port: int = 0, wrap: Callable[[Any], Any] | None = None) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        if wrap is not None:  # a WSGI middleware around moto's app
            app = wrap(app)
        self._server = make_server(
            "127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket: connections to the port are refused."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=BotoConfig(s3={"addressing_style": "path"}),
    )


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    s = S3Server()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The daemon and CLI subprocesses inherit this: no AWS credentials but ours."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254


@pytest.fixture
def bucket(server: S3Server) -> str:
    name = f"archived-{uuid.uuid4().hex[:12]}"
    client(server.endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def creds_file(tmp_path: Path) -> Path:
    path = tmp_path / "aws-credentials"
    path.write_text(
        f"[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n\n"
        f"[archived]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    path.chmod(0o600)
    return path


def use_s3(root: Root, endpoint: str, bucket: str, **options: Any) -> None:
    """Config with two targets: localdir `primary` and s3 `cloud`."""
    root.targets.pop("offsite", None)
    extra = {k: options.pop(k) for k in list(options) if k in ("retry", "retention")}
    root.write_config(
        storage__cloud={
            "driver": "s3",
            "bucket": bucket,
            "endpoint": endpoint,
            "prefix": "archives/",
            **options,
        },
        **extra,
    )


def env_credentials() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}


def cloud_copy(job: dict[str, Any]) -> dict[str, Any]:
    (copy,) = [c for c in job["copies"] if c["target"] == "cloud"]
    return copy


def object_key(job: dict[str, Any], bucket: str) -> str:
    path = cloud_copy(job)["path"]
    assert path.startswith(f"s3://{bucket}/archives/")
    return str(path.removeprefix(f"s3://{bucket}/"))


def download(endpoint: str, bucket: str, key: str) -> bytes:
    return bytes(client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read())


def unfinished_uploads(endpoint: str, bucket: str) -> list[Any]:
    return list(client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def completed(root: Root, job_file: Path) -> dict[str, Any]:
    (job_id,) = root.submit(job_file)
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    return job


@pytest.mark.slow
def test_a_job_is_stored_on_s3_and_reads_back_identical(
    root: Root, server: S3Server, bucket: str, creds_file: Path
) -> None:
    use_s3(root, server.endpoint, bucket, credentials_file=str(creds_file), profile="archived")
    root.start()
    job = completed(root, root.job_file("to-cloud"))
    key = object_key(job, bucket)
    assert key == f"archives/to-cloud/{job['archive']['name']}"
    copy = cloud_copy(job)
    assert (copy["size"], copy["sha256"]) == (job["archive"]["size"], job["archive"]["sha256"])

    head = client(server.endpoint).head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == job["archive"]["size"]
    assert head["Metadata"] == {"sha256": job["archive"]["sha256"]}
    assert "-" not in head["ETag"]  # one PUT, not a multipart upload
    local = root.archives("primary")[0].read_bytes()
    data = download(server.endpoint, bucket, key)
    assert data == local
    assert hashlib.sha256(data).hexdigest() == job["archive"]["sha256"]
    fetched = root.path / "fetched.tar"
    fetched.write_bytes(data)
    result = root.cli("verify", "--key", str(root.public_key), str(fetched))
    assert result.returncode == 0, result.stdout + result.stderr
    assert unfinished_uploads(server.endpoint, bucket) == []


@pytest.mark.slow
def test_a_large_archive_goes_up_in_parts_with_credentials_from_the_environment(
    root: Root, server: S3Server, bucket: str
) -> None:
    big = root.sources / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(os.urandom(12 * MiB))
    use_s3(root, server.endpoint, bucket, part_size=5 * MiB)
    root.start(env=env_credentials())
    job = completed(
        root,
        root.job_file("large", activities=[{"name": "b", "driver": "files", "path": str(big)}]),
    )
    assert 10 * MiB < job["archive"]["size"] <= 15 * MiB
    key = object_key(job, bucket)
    head = client(server.endpoint).head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # CompleteMultipartUpload of 3 parts
    assert head["ContentLength"] == job["archive"]["size"]
    assert head["Metadata"]["sha256"] == job["archive"]["sha256"]
    data = download(server.endpoint, bucket, key)
    assert data == root.archives("primary")[0].read_bytes()
    fetched = root.path / "fetched.tar"
    fetched.write_bytes(data)
    assert root.cli("verify", "--key", str(root.public_key), str(fetched)).returncode == 0
    assert unfinished_uploads(server.endpoint, bucket) == []


@pytest.mark.slow
def test_an_unreachable_endpoint_is_retried_until_it_is_back(root: Root, bucket: str) -> None:
    flaky = S3Server()
    port = flaky.port
    use_s3(
        root,
        flaky.endpoint,
        bucket,
        retry={"max_attempts": 50, "backoff": "200ms", "backoff_max": "500ms"},
    )
    root.start(env=env_credentials())  # the bucket is there at start: ready() passes
    flaky.stop()  # now the port refuses connections
    (job_id,) = root.submit(root.job_file("patient"))

    def retried() -> dict[str, Any] | None:
        job = root.show(job_id)
        states = [h["state"] for h in job["history"]]
        return job if "recoverable_error" in states else None

    job = wait_until(retried, 30, "a recoverable error")
    assert job["state"] != "failed"
    errors = [h["reason"] for h in job["history"] if h["state"] == "error"]
    assert any("Could not connect to the endpoint URL" in r for r in errors), errors
    back = S3Server(port)  # the same port, the same buckets
    try:
        job = root.wait_state(job_id, "completed", "failed", timeout=30)
        assert job["state"] == "completed", job
        key = object_key(job, bucket)
        assert download(back.endpoint, bucket, key) == root.archives("primary")[0].read_bytes()
    finally:
        back.stop()


@pytest.mark.slow
def test_a_bucket_gone_fails_the_job_at_once_with_the_service_error_code(
    root: Root, server: S3Server, bucket: str, creds_file: Path
) -> None:
    use_s3(root, server.endpoint, bucket, credentials_file=str(creds_file), profile="archived")
    root.start()
    client(server.endpoint).delete_bucket(Bucket=bucket)
    (job_id,) = root.submit(root.job_file("orphan"))
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "failed"
    assert "NoSuchBucket" in job["error"]
    assert f"s3://{bucket}/archives/orphan/" in job["error"]
    states = [h["state"] for h in job["history"]]
    assert "recoverable_error" not in states  # not retried: no attempt could fix it
    # the verified local copy is kept (a good copy is never thrown away because another
    # target failed), recorded, and `archived retry` stores it in S3 once the bucket is back
    assert [c["target"] for c in job["copies"]] == ["primary"]
    assert [p.name for p in root.archives("primary")] == [job["archive"]["name"]]


@pytest.mark.slow
def test_audit_finds_a_damaged_object_and_repairs_it_from_the_local_copy(
    root: Root, server: S3Server, bucket: str, creds_file: Path
) -> None:
    use_s3(root, server.endpoint, bucket, credentials_file=str(creds_file), profile="archived")
    root.start()
    job = completed(root, root.job_file("audited"))
    key = object_key(job, bucket)
    good = root.archives("primary")[0].read_bytes()
    s3 = client(server.endpoint)
    # Same size, same sha256 in the metadata, other bytes: only a read-back can tell.
    bad = bytearray(good)
    bad[2000] ^= 0xFF
    s3.put_object(
        Bucket=bucket, Key=key, Body=bytes(bad), Metadata={"sha256": job["archive"]["sha256"]}
    )
    result = root.cli("audit", job["id"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cloud         damaged" in result.stdout
    assert f"damaged: s3://{bucket}/{key} has sha256" in result.stdout
    assert "cloud         repaired" in result.stdout
    assert "2 copies audited, 1 bad, 1 repaired" in result.stdout
    assert download(server.endpoint, bucket, key) == good

    s3.delete_object(Bucket=bucket, Key=key)
    result = root.cli("audit", job["id"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"missing: s3://{bucket}/{key}" in result.stdout
    assert "cloud         repaired" in result.stdout
    assert download(server.endpoint, bucket, key) == good
    assert root.cli("audit", job["id"]).stdout.count("sha256 matches") == 2
    results = [a["result"] for a in root.show(job["id"])["audits"] if a["target"] == "cloud"]
    assert results == ["damaged", "repaired", "missing", "repaired", "ok"]


@pytest.mark.slow
def test_retention_deletes_the_object(root: Root, server: S3Server, bucket: str) -> None:
    use_s3(root, server.endpoint, bucket, retention={"check_interval": "100ms"})
    root.start(env=env_credentials())
    job = completed(root, root.job_file("short-lived", retention_days=1))
    key = object_key(job, bucket)
    s3 = client(server.endpoint)
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == job["archive"]["size"]
    # an upload of the same key that a crashed attempt left unfinished goes too
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
    s3.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1000
    )
    assert len(unfinished_uploads(server.endpoint, bucket)) == 1
    expire_now(root, job["id"])
    job = root.wait_state(job["id"], "deleted")
    with pytest.raises(ClientError) as gone:
        s3.head_object(Bucket=bucket, Key=key)
    assert gone.value.response["Error"]["Code"] == "404"
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert unfinished_uploads(server.endpoint, bucket) == []
    assert root.archives("primary") == []
    assert all(c["deleted_at"] for c in job["copies"])


@pytest.mark.slow
def test_an_object_uploaded_before_a_crash_is_adopted_not_uploaded_again(
    root: Root, server: S3Server, bucket: str
) -> None:
    s3 = client(server.endpoint)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    use_s3(root, server.endpoint, bucket)
    # killed right after the upload completed, before the database heard of it
    daemon = root.start(env={"ARCHIVED_FAILPOINTS": "store.after_rename=kill", **env_credentials()})
    (job_id,) = root.submit(root.job_file("crashed", storage=["cloud"]))
    assert daemon.wait_exit(60) == -signal.SIGKILL
    assert root.show(job_id)["state"] == "store"
    root.start(env=env_credentials())
    job = root.wait_state(job_id, "completed", "failed")
    assert job["state"] == "completed", job
    key = object_key(job, bucket)
    versions = s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    assert len(versions) == 1  # read back and adopted: no second PUT
    assert s3.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == job["archive"]["sha256"]


@pytest.mark.slow
def test_credentials_and_bucket_problems_are_config_errors(
    root: Root, server: S3Server, bucket: str, creds_file: Path
) -> None:
    # No credentials anywhere: the standard chain finds none.
    use_s3(root, server.endpoint, bucket)
    result = root.cli("check-config")
    assert result.returncode == 78
    assert "Unable to locate credentials" in result.stderr
    # The credentials file is the only source when it is named: its profile must exist.
    use_s3(root, server.endpoint, bucket, credentials_file=str(creds_file), profile="nope")
    result = root.cli("check-config", env=env_credentials())
    assert result.returncode == 78
    assert "has no [nope] section" in result.stderr
    # A bucket that is not there.
    use_s3(root, server.endpoint, "no-such-bucket-here", credentials_file=str(creds_file))
    result = root.cli("check-config")
    assert result.returncode == 78
    assert "'no-such-bucket-here'" in result.stderr and "NoSuchBucket" in result.stderr
    # A part size below S3's minimum.
    use_s3(root, server.endpoint, bucket, part_size=MiB)
    result = root.cli("check-config")
    assert result.returncode == 78
    assert "storage.cloud.part_size" in result.stderr
    # TLS that fails (here: a plain HTTP server) is configuration too, not weather
    tls = server.endpoint.replace("http://", "https://")
    use_s3(root, tls, bucket, credentials_file=str(creds_file), profile="archived")
    result = root.cli("check-config")
    assert result.returncode == 78
    assert "SSL validation failed" in result.stderr
    # An endpoint that does not answer is weather: a warning, and the daemon starts
    gone = S3Server()
    gone.stop()
    use_s3(root, gone.endpoint, bucket, credentials_file=str(creds_file), profile="archived")
    result = root.cli("check-config")
    assert result.returncode == 0, result.stderr
    assert (
        f"archived: warning: storage.cloud: bucket '{bucket}' at {gone.endpoint}: "
        "Could not connect to the endpoint URL"
    ) in result.stderr
    assert "jobs that store there wait for it" in result.stderr


async def test_the_driver_leaves_no_partial_object_and_deletes_idempotently(
    server: S3Server, bucket: str, creds_file: Path, tmp_path: Path
) -> None:
    driver = S3Driver(
        "cloud",
        S3Options(
            bucket=bucket,
            endpoint=server.endpoint,
            credentials_file=creds_file,
            profile="archived",
            part_size=5 * MiB,
        ),
    )
    await driver.ready()
    # The archive as staging holds it: pieces whose concatenation it is, split so that
    # upload parts (5 MiB) begin and end inside pieces and span them.
    whole = os.urandom(11 * MiB)
    cuts = [0, 3 * MiB, 3 * MiB + 1, 7 * MiB + 512, 11 * MiB]
    archive = [tmp_path / f"piece{i}" for i in range(len(cuts) - 1)]
    for piece, start, end in zip(archive, cuts, cuts[1:], strict=False):
        piece.write_bytes(whole[start:end])
    sha256, size = hashlib.sha256(whole).hexdigest(), 11 * MiB
    # A digest the file does not have: every part goes up, then the upload is aborted.
    with pytest.raises(StorageError, match="does not match its sha256") as bad:
        await driver.put(archive, "j/x.tar", known_digest("0" * 64), size)
    assert bad.value.kind == "recoverable"
    assert unfinished_uploads(server.endpoint, bucket) == []
    assert await driver.check("j/x.tar", sha256, size) == f"missing: s3://{bucket}/j/x.tar"

    copy = await driver.put(archive, "j/x.tar", known_digest(sha256), size)
    assert (copy.path, copy.size, copy.sha256) == (f"s3://{bucket}/j/x.tar", size, sha256)
    assert await driver.check("j/x.tar", sha256, size) is None
    fetched = tmp_path / "fetched.tar"
    await driver.fetch("j/x.tar", fetched)
    assert fetched.read_bytes() == whole
    assert await driver.delete("j/x.tar") is True
    assert await driver.delete("j/x.tar") is False
    with pytest.raises(StorageError, match="NoSuchKey") as missing:
        await driver.fetch("j/x.tar", fetched)
    assert missing.value.kind == "fatal"


def _error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("error", "recoverable"),
    [
        (_error("AccessDenied", 403), False),
        (_error("NoSuchBucket", 404), False),
        (_error("InvalidAccessKeyId", 403), False),
        (_error("SignatureDoesNotMatch", 403), False),
        (_error("403", 403), False),  # a HEAD request's bare status
        (_error("InvalidArgument", 400), False),
        (_error("SlowDown", 503), True),
        (_error("InternalError", 500), True),
        (_error("RequestTimeout", 400), True),
        (_error("TooManyRequests", 429), True),
        (_error("BadDigest", 400), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
    ],
)
def test_errors_are_classified(error: Exception, recoverable: bool) -> None:
    assert is_recoverable(error) is recoverable


def test_options_are_checked() -> None:
    opts = S3Options.model_validate({"bucket": "b"})
    assert (opts.part_size, opts.addressing_style, opts.region) == (64 * MiB, "path", "us-east-1")
    for bad in (
        {"bucket": "b", "secret": "x"},
        {"bucket": "b", "part_size": 4 * MiB},
        {"bucket": "b", "endpoint": "ftp://x"},
        {"bucket": "b", "credentials_file": "relative/creds"},
        {"bucket": "b", "addressing_style": "sideways"},
    ):
        with pytest.raises(ValueError):
            S3Options.model_validate(bad)


@pytest.mark.slow
def test_audit_tells_an_unreachable_endpoint_from_a_damaged_object(root: Root, bucket: str) -> None:
    far = S3Server()
    use_s3(root, far.endpoint, bucket)
    root.start(env=env_credentials())
    job = completed(root, root.job_file("far"))
    far.stop()  # the endpoint refuses connections now
    result = root.cli("audit", job["id"], env=env_credentials())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cloud         unreachable" in result.stdout
    assert "Could not connect to the endpoint URL" in result.stdout
    assert "cloud         damaged" not in result.stdout
    assert "cloud         repaired" not in result.stdout
    assert "2 copies audited, 0 bad, 0 repaired, 1 unreachable" in result.stdout
    job = root.show(job["id"])
    audits = {a["target"]: a["result"] for a in job["audits"]}
    assert audits == {"cloud": "unreachable", "primary": "ok"}
    assert cloud_copy(job)["audit_result"] == "unreachable"


class Gate:
    """WSGI middleware that holds the next request, once armed, until opened: a target
    that keeps the daemon waiting (a slow or half-dead endpoint)."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = threading.Event()
        self.opened = threading.Event()

    def wrap(self, app: Any) -> Any:
        def gated(environ: Any, start_response: Any) -> Any:
            if self.armed:
                self.armed = False
                self.reached.set()
                self.opened.wait(30)
            return app(environ, start_response)

        return gated


@pytest.mark.slow
def test_a_hold_placed_while_retention_waits_on_a_target_stops_the_rest_of_the_round(
    root: Root, bucket: str
) -> None:
    gate = Gate()
    slow = S3Server(wrap=gate.wrap)
    try:
        use_s3(root, slow.endpoint, bucket, retention={"check_interval": "100ms"})
        daemon = root.start(env=env_credentials())
        job = completed(root, root.job_file("evidence", retention_days=1))
        gate.armed = True
        expire_now(root, job["id"])
        wait_until(gate.reached.is_set, 30, "retention to wait on the cloud copy")
        result = root.cli("hold", job["id"])
        assert result.returncode == 0 and "retention will not delete it" in result.stdout
        gate.opened.set()  # the delete already under way goes through

        def round_over() -> bool:
            return root.show(job["id"])["state"] == "deleted" or any(
                e.get("event") == "retention: stopped by a legal hold" for e in daemon.events()
            )

        wait_until(round_over, 30, "the retention round to end")
        job = root.show(job["id"])
        assert job["state"] == "completed" and job["legal_hold"]
        assert len(root.archives("primary")) == 1
        deleted = {c["target"]: c["deleted_at"] for c in job["copies"]}
        assert deleted["cloud"] and deleted["primary"] is None
        assert "deleted" not in [h["state"] for h in job["history"]]

        assert root.cli("release", job["id"]).returncode == 0
        root.wait_state(job["id"], "deleted")
        assert root.archives("primary") == []
    finally:
        gate.opened.set()
        slow.stop()


@pytest.mark.slow
def test_object_lock_keeps_each_copy_until_its_retention_and_holds_reach_the_bucket(
    root: Root, server: S3Server, bucket: str, creds_file: Path
) -> None:
    creds = {"credentials_file": str(creds_file), "profile": "archived"}
    # a target that asks for locks on a bucket that cannot lock: a config error
    use_s3(root, server.endpoint, bucket, object_lock="COMPLIANCE", **creds)
    result = root.cli("check-config")
    assert result.returncode == 78
    assert "object_lock = 'COMPLIANCE', but the bucket has no Object Lock" in result.stderr

    s3 = client(server.endpoint)
    locked = f"locked-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    use_s3(
        root,
        server.endpoint,
        locked,
        object_lock="GOVERNANCE",
        part_size=5 * MiB,
        retention={"check_interval": "100ms"},
        **creds,
    )
    daemon = root.start()
    big = root.sources / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(os.urandom(6 * MiB))
    files = [{"name": "b", "driver": "files", "path": str(big)}]
    jobs = [
        completed(root, root.job_file("sealed", retention_days=1)),  # one PUT
        completed(root, root.job_file("large", retention_days=2, activities=files)),  # parts
    ]
    for job, days in zip(jobs, (1, 2), strict=True):
        head = s3.head_object(Bucket=locked, Key=object_key(job, locked))
        assert head["ObjectLockMode"] == "GOVERNANCE"
        until = head["ObjectLockRetainUntilDate"]
        assert datetime.now(UTC) + timedelta(days=days, minutes=-5) < until
        assert until <= datetime.fromisoformat(job["expires_at"])  # retention can delete it
    job = jobs[0]
    key = object_key(job, locked)
    version = s3.head_object(Bucket=locked, Key=key)["VersionId"]
    with pytest.raises(ClientError) as denied:  # not even the bucket's owner, early
        s3.delete_object(Bucket=locked, Key=key, VersionId=version)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"

    def legal_hold() -> str:
        return str(s3.get_object_legal_hold(Bucket=locked, Key=key)["LegalHold"]["Status"])

    result = root.cli("hold", job["id"])
    assert result.returncode == 0, result.stderr
    assert f"storage.cloud: S3 legal hold ON on s3://{locked}/{key}" in result.stdout
    assert legal_hold() == "ON"
    assert root.cli("release", job["id"]).returncode == 0
    assert legal_hold() == "OFF"

    # due in the database, still locked in the bucket: retention waits for the lock
    expire_now(root, job["id"])
    wait_until(
        lambda: any("under Object Lock until" in e.get("error", "") for e in daemon.events()),
        30,
        "retention to meet the lock",
    )
    assert root.show(job["id"])["state"] == "completed"
    assert cloud_copy(root.show(job["id"]))["deleted_at"] is None
    # the lock date passes (here: an administrator allowed to bypass GOVERNANCE moves it)
    s3.put_object_retention(
        Bucket=locked,
        Key=key,
        VersionId=version,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC)},
        BypassGovernanceRetention=True,
    )
    root.wait_state(job["id"], "deleted")
    versions = s3.list_object_versions(Bucket=locked, Prefix=key)
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []


class HoldWrite(Gate):
    """A Gate for the next write (a PUT or POST): held until opened, then let through,
    or refused (`refuse`: 403 AccessDenied, which botocore does not try again)."""

    def __init__(self, refuse: bool) -> None:
        super().__init__()
        self.refuse = refuse

    def wrap(self, app: Any) -> Any:
        def held(environ: Any, start_response: Any) -> Any:
            if not (self.armed and environ["REQUEST_METHOD"] in ("PUT", "POST")):
                return app(environ, start_response)
            self.armed = False
            self.reached.set()
            self.opened.wait(30)
            if not self.refuse:
                return app(environ, start_response)
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<Error><Code>AccessDenied</Code><Message>refused</Message></Error>"]

        return held


@pytest.mark.parametrize("fails", [False, True], ids=["then-stored", "then-refused"])
async def test_a_hold_placed_while_the_copies_are_made_reaches_every_copy_made(
    root: Root, server: S3Server, monkeypatch: pytest.MonkeyPatch, failpoints: Any, fails: bool
) -> None:
    """A copy made while another target's runs on is committed with it: a hold placed
    meanwhile finds no copy to hold. Once that other target is done, or has failed, the
    copies made are committed and held all the same (a retry's lock has the hold, and
    would not see that it changed)."""
    import anyio

    from archived import actions, phase
    from archived.store_open import open_store

    monkeypatch.setattr(phase, "FINISH_AFTER", 600.0)  # kept until the phase ends
    for name, value in env_credentials().items():
        monkeypatch.setenv(name, value)
    s3 = client(server.endpoint)
    locked = f"locked-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    gate = HoldWrite(refuse=fails)
    refusing = S3Server(wrap=gate.wrap)
    client(refusing.endpoint).create_bucket(Bucket="refusing")
    try:
        root.targets.pop("offsite", None)
        root.write_config(
            storage__cloud={
                "driver": "s3",
                "bucket": locked,
                "endpoint": server.endpoint,
                "object_lock": "GOVERNANCE",
            },
            storage__refusing={
                "driver": "s3",
                "bucket": "refusing",
                "endpoint": refusing.endpoint,
            },
            retry={"max_attempts": 1},
        )
        (job_id,) = root.drop(root.job_file("evidence", retention_days=1))
        failpoints.at("store", lambda: setattr(gate, "armed", True))

        async def hold_while_refusing_waits() -> None:
            while not (gate.reached.is_set() and s3.list_objects_v2(Bucket=locked)["KeyCount"]):
                await anyio.sleep(0.05)
            config = root.load_config()  # as `archived hold` does it
            store = await open_store(config, create=False)
            assert store is not None
            try:
                held = await actions.hold(store, config, job_id, True)
            finally:
                await store.close()
            assert held == actions.Held([], "")  # no copy on record yet
            gate.opened.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_while_refusing_waits)
            await root.run_until_idle()
        job = await root.details(job_id)
        if fails:
            assert job["state"] == "failed" and "refusing" in job["error"], job["error"]
        else:
            assert job["state"] == "completed", job["error"]
        (key,) = [o["Key"] for o in s3.list_objects_v2(Bucket=locked)["Contents"]]
        status = s3.get_object_legal_hold(Bucket=locked, Key=key).get("LegalHold", {}).get("Status")
        assert status == "ON"
        made = {"cloud", "primary"} | (set() if fails else {"refusing"})
        assert {c["target"] for c in job["copies"]} == made
    finally:
        gate.opened.set()
        refusing.stop()
