"""A campaign whose directory is an object-store URI (s3://), against a local S3-compatible server
(moto): the driver writes everything there, workers send their shards through Ray to the driver, and
resume, status and estimate read it back."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.cli import main
from orchestrator.driver import run_campaign
from test_faults import spec_text, undisturbed


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    moto = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pyproject [test])")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    from pyarrow import fs

    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&allow_bucket_creation=true"
    filesystem, _ = fs.FileSystem.from_uri(f"s3://campaigns?{query}")
    filesystem.create_dir("campaigns")
    yield lambda prefix: f"s3://campaigns/{prefix}?{query}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_campaign_on_s3(ray_session, s3, tmp_path_factory):
    uri = s3("faults")
    c = create_or_open(specs.loads(spec_text(runs=24), "s.toml"), uri)
    assert str(c.paths.root) == "s3://campaigns/faults"
    report = run_campaign(c, progress=False)
    assert report.trained == 24 and report.complete
    assert len(c.finished_runs()) == 24
    assert c.paths.summary.exists() and c.paths.checkpoint.exists() and not c.paths.lock.exists()
    reference = undisturbed(tmp_path_factory, 24)
    from workers.storage import open_input

    with open_input(c.paths.influence) as f:
        assert np.load(f).tobytes() == np.load(reference / "estimates" / "influence.npy").tobytes()
    # resume trains nothing; status and estimate read the campaign from the store
    again = run_campaign(create_or_open(None, uri), progress=False)
    assert again.trained == 0 and again.already_done == 24
    r = CliRunner().invoke(main, ["status", uri, "--json"], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.output)["runs_finished"] == 24
    r = CliRunner().invoke(main, ["estimate", uri, "--top", "3"], catch_exceptions=False)
    assert r.exit_code == 0 and "24/24 runs folded" in r.output


def test_a_second_driver_on_an_object_store_is_refused(s3):
    from orchestrator.lock import DriverLock, LockedError

    c = create_or_open(specs.loads(spec_text(runs=4), "s.toml"), s3("locked"))
    first = DriverLock(c.paths.lock)
    first.acquire()
    with pytest.raises(LockedError, match="another driver is running this campaign"):
        DriverLock(c.paths.lock).acquire()
    first.release()
    assert not c.paths.lock.exists()
