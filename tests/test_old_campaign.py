"""A campaign directory written by the code before the issue-10 refactor resumes under the current code with
the same spec hash, and its finished estimates are bit-identical to what the old code wrote.

tests/fixtures/old_campaign/ was made by tests/fixtures/make_old_campaign.py at commit b8e8204: a pinned
24-run campaign of the self-test learner (deterministic numpy), interrupted after 12 folded runs with 21
shards on disk; tests/fixtures/old_campaign.json holds its spec hash and the sha256 of every estimates file
the old code wrote when it resumed that directory to completion. Soft (margin) values now fold as exact
fixed point (estimators/stats.py), so the three files that hold them are compared with the old code's own
output (tests/fixtures/old_campaign_finished/, made by the maker's --finished) within the fixed point's
rounding; every other file, 0/1 estimates and all, by its sha256.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign

FIXTURES = Path(__file__).parent / "fixtures"
# the digest recipe exists once: the maker's digests() made the recorded hashes, and the test uses it too
_spec = importlib.util.spec_from_file_location("make_old_campaign", FIXTURES / "make_old_campaign.py")
_maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_maker)


@pytest.fixture
def old_campaign(tmp_path):
    root = tmp_path / "old_campaign"
    shutil.copytree(FIXTURES / "old_campaign", root)
    return root


def test_the_fixture_is_an_interrupted_campaign(old_campaign):
    expected = json.loads((FIXTURES / "old_campaign.json").read_text())
    c = create_or_open(None, old_campaign, load_data=False)
    assert c.spec.result_hash() == expected["spec_hash"]
    assert len(c.finished_runs()) == expected["shards_in_fixture"] < c.plan.runs == expected["runs"]
    assert not json.loads(c.paths.summary.read_text())["complete"]


def test_an_old_campaign_resumes_to_the_old_codes_estimates(ray_session, old_campaign):
    expected = json.loads((FIXTURES / "old_campaign.json").read_text())
    c = create_or_open(None, old_campaign)
    assert c.spec.result_hash() == expected["spec_hash"]
    report = run_campaign(c, progress=False)
    assert report.complete and report.trained == expected["runs"] - expected["shards_in_fixture"]
    assert report.already_done == expected["shards_in_fixture"] and not report.failed
    got = _maker.digests(old_campaign)
    assert sorted(got) == sorted(expected["estimates_sha256"]), "the set of estimates files changed"
    differ = [name for name, digest in expected["estimates_sha256"].items()
              if got[name] != digest and name not in _maker.SOFT_FILES]
    assert not differ, f"estimates that differ from the old code's: {differ}"
    old, new = FIXTURES / "old_campaign_finished", old_campaign / "estimates"
    # Fixed point moves a margin by <= 2**-28 and its square by <= 2**-22 (standard errors near 0.5:
    # measured 1.5e-8, float32 influence SEs 1.8e-7, its own ulp). One run more or less moves them ~1e-2.
    for name in ("influence_margin.npy", "influence_margin_se.npy"):
        np.testing.assert_allclose(np.load(new / name), np.load(old / name), rtol=1e-6, atol=1e-6, err_msg=name)
    a, b = (pq.read_table(d / "memorization.parquet") for d in (new, old))
    assert a.column_names == b.column_names
    for col in a.column_names:
        x, y = (t[col].to_numpy(zero_copy_only=False) for t in (a, b))
        if col.endswith("_margin"):
            np.testing.assert_allclose(x, y, rtol=1e-7, atol=1e-7, err_msg=col)
        else:
            assert x.tobytes() == y.tobytes(), col
