"""A campaign directory written by the code before the issue-10 refactor resumes under the current code with
the same spec hash, and its finished estimates are bit-identical to what the old code wrote.

tests/fixtures/old_campaign/ was made by tests/fixtures/make_old_campaign.py at commit b8e8204: a pinned
24-run campaign of the self-test learner (deterministic numpy), interrupted after 12 folded runs with 21
shards on disk; tests/fixtures/old_campaign.json holds its spec hash and the sha256 of every estimates file
the old code wrote when it resumed that directory to completion.
"""

import importlib.util
import json
import shutil
from pathlib import Path

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
    differ = [name for name, digest in expected["estimates_sha256"].items() if got[name] != digest]
    assert not differ, f"estimates that differ from the old code's: {differ}"
