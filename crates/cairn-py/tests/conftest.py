import os
import urllib.request
import uuid

import pytest

import cairn


@pytest.fixture
def store(tmp_path):
    """A fresh store with a small staging pool and chunk size, so that
    tests exercise several chunks and a pool that has to recycle."""
    return cairn.Store(tmp_path / "ckpt", staging_bytes=8 << 20, chunk_size=1 << 20)


@pytest.fixture
def s3_remote():
    """(url, options) of a fresh bucket on the loopback S3 server that
    scripts/test starts (CAIRN_TEST_S3_ENDPOINT)."""
    ep = os.environ.get("CAIRN_TEST_S3_ENDPOINT")
    if not ep:
        pytest.fail("CAIRN_TEST_S3_ENDPOINT is not set: run the suite with scripts/test")
    bucket = f"cairn-py-{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(f"{ep}/{bucket}", method="PUT", data=b"")
    with urllib.request.urlopen(req) as r:
        assert r.status == 200
    opts = {
        "endpoint": ep,
        "allow_http": "true",
        "region": "us-east-1",
        "access_key_id": "cairn-test",
        "secret_access_key": "cairn-test-secret",
    }
    return f"s3://{bucket}/ckpt", opts
