"""One Ray instance per test session (start-up costs seconds), pinned to 2 CPUs and isolated from any
other Ray on the machine: a private RAY_TMPDIR, address="local", no token, no usage reporting."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the plug-in examples, importable as `plugins`


def pytest_configure(config):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster


@pytest.fixture(scope="session")
def ray_session():
    import ray

    tmp = tempfile.mkdtemp(prefix="lt-ray-")  # short: Ray's socket paths must stay under 107 characters
    os.environ["RAY_TMPDIR"] = tmp
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "examples"), str(ROOT / "tests"),
                                  os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", _temp_dir=tmp,
             # aot_eager: campaigns with [train] compile = true trace and compile in seconds, not minutes of C++
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "LONGTAIL_COMPILE_BACKEND": "aot_eager"}})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
