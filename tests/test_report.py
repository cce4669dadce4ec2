"""`longtail report`: the page is built from synthetic campaigns (no training, no Ray), rendered in
headless Chromium (Debian's `chromium` package; `make test` installs it), and checked: every section with
its heading and a figure, every image decoded from the page itself, a screenshot that is not blank;
image galleries for an image dataset (digits), tables for vectors; in-progress and failed runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from estimators.reference import reference_memorization
from orchestrator.features import report
from orchestrator import spec as specs
from orchestrator.fold import Aggregator
from orchestrator.campaign import create_or_open
from orchestrator.cli import main
from orchestrator.driver import RunReport, fold_existing, record_failure
from orchestrator.estimates_files import write_estimates
from synthetic import make_campaign
from workers.shard import build_table, write_shard

SECTIONS = {"memorization": "Memorization", "gallery": "Most memorized training examples",
            "influence": "High-influence pairs", "table1": "Table 1, memorization shares and consistency",
            "convergence": "Convergence", "runs": "Runs: accuracy and failures",
            "utility": "Marginal utility of memorized examples", "privacy": "Privacy risk",
            "proxies": "Training-dynamics proxies and triage"}
# sections drawn only when their inputs exist: `longtail utility` has run; shards with training dynamics
NEEDS = {"utility": "utility/utility.parquet", "proxies": "estimates/proxies.parquet",
         "privacy": "estimates/privacy_risk.parquet"}

DIGITS_SPEC = """
[campaign]
name = "digits-synth"
seed = 3
runs = {runs}
subset_ratio = 0.7
[dataset]
name = "digits"
[model]
name = "mlp"
[train]
trainer = "plugins:nearest_neighbour"
[estimates]
influence = "{mode}"
"""


def make_digits_campaign(root, runs=40, written=None, mode="dense"):
    """A digits campaign with synthetic shards, like tests/synthetic.py: every training example is right
    with probability 0.9 in the runs that train on it and a random p_out in the others; each test
    example has a same-class training "twin" whose presence lifts it from 0.2 to 0.95: an influence of
0.75, far above the noise of 40 runs, so every test example's strongest influencer is its twin."""
    c = create_or_open(specs.loads(DIGITS_SPEC.format(runs=runs, mode=mode), "digits.toml"), root)
    d, rng = c.dataset, np.random.default_rng(7)
    masks = c.plan.dense()
    p_out = rng.random(d.n_train)
    twin = np.array([rng.choice(np.flatnonzero(d.y_train == y)) for y in d.y_test])
    for r in range(runs if written is None else written):
        m = masks[r]
        right = rng.random(d.n_train) < np.where(m, 0.9, p_out)
        t_right = rng.random(d.n_test) < np.where(m[twin], 0.95, 0.2)
        train_pred = np.where(right, d.y_train, (d.y_train + 1) % d.num_classes)
        test_pred = np.where(t_right, d.y_test, (d.y_test + 1) % d.num_classes)
        meta = {"campaign": c.name, "spec_hash": c.spec.result_hash(), "run": r, "n_train": d.n_train,
                "n_test": d.n_test, "test_acc": float(t_right.mean())}
        wrong = ~right[m]  # training dynamics that follow the synthetic outcomes (the proxies section)
        dynamics = {"loss_sum": wrong * 5 + rng.random(int(m.sum())), "learn_epoch": wrong * 10, "forgets": wrong * 1}
        write_shard(c.paths.shard(r), build_table(m, train_pred, test_pred, d.y_train, d.y_test, d.num_classes,
                                                  meta, dynamics=dynamics))
    return c


def estimate(c, complete=True):
    agg = Aggregator(c, from_scratch=True)
    fold_existing(c, agg, RunReport(planned=c.plan.runs, already_done=0))
    agg.save_checkpoint()
    return write_estimates(agg, complete=complete, final=complete)


def make_report(c) -> str:
    r = CliRunner().invoke(main, ["report", str(c.paths.root)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output, r.output  # no section failed
    assert c.paths.report.exists()
    return c.paths.report.read_text()


# --- reading the page -----------------------------------------------------------------------------


class Page(HTMLParser):
    """What the checks need from a page: sections with their heading, figures and images; every
    resource reference; and the attributes of <body> (where the probe writes its counts)."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.images: list[dict] = []
        self.references: list[str] = []
        self.tags: set[str] = set()
        self.body: dict = {}
        self._section = None
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "body":
            self.body = a
        if tag == "section":
            self._section = a.get("id")
            self.sections[self._section] = {"heading": "", "figures": 0, "images": 0, "thumbs": 0}
        sec = self.sections.get(self._section)
        if tag == "h2":
            self._in_h2 = True
        if tag == "figure" and sec is not None:
            sec["figures"] += 1
        if tag == "img":
            self.images.append(a)
            if sec is not None:
                sec["images"] += 1
                sec["thumbs"] += "thumb" in a.get("class", "")
        for key in ("src", "href", "srcset", "poster", "data"):
            if key in a:
                self.references.append(a[key])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._in_h2 and self._section in self.sections:
            self.sections[self._section]["heading"] += data


# Appended to a copy of the page (the report itself has no script): after the load event, count the
# images that failed to load or decode, so that a broken resource shows up in the dumped DOM.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
});</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium_path() -> str:
    path = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
    if not path:  # never skip: CI installs it (.ci/run), and without it the page is not checked at all
        pytest.fail("chromium is not installed; the report test renders the page in Debian's chromium: "
                    "apt-get update && apt-get install -y --no-install-recommends chromium", pytrace=False)
    return path


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    out = subprocess.run([chromium_path(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out


def render_in_chromium(page: Path, tmp: Path) -> tuple[Page, np.ndarray]:
    """The DOM after load (with the probe's counts) and the screenshot as a grey-level array."""
    from PIL import Image

    text = page.read_text()
    # The probe needs a script, which the page's content security policy forbids: drop it in the copy.
    probe = page.with_name("probe.html")
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
                     .replace("</body>", PROBE + "</body>"))
    dom = Page(chromium(tmp, "--dump-dom", probe.as_uri()).stdout)
    probe.unlink()
    shot = tmp / "screenshot.png"
    chromium(tmp, f"--screenshot={shot}", "--window-size=1400,4000", page.as_uri())
    assert shot.exists(), "chromium wrote no screenshot"
    return dom, np.asarray(Image.open(shot).convert("L"), dtype=np.float32)


def check_page(html_text: str, page_path: Path, tmp: Path) -> Page:
    """The checks every report passes, in the raw HTML and in the DOM Chromium builds from it."""
    raw = Page(html_text)
    assert "could not be drawn" not in html_text
    assert not ({"script", "link", "iframe", "object", "embed"} & raw.tags), raw.tags
    assert not re.search(r"url\(", html_text), "CSS must not reference resources"
    for ref in raw.references:  # inline, or a file beside the page: never a URL
        assert ref.startswith("data:") or (page_path.parent / ref).exists(), ref[:100]
    dom, shot = render_in_chromium(page_path, tmp)
    assert set(dom.sections) == set(SECTIONS), dom.sections.keys()
    for sid, title in SECTIONS.items():
        sec = dom.sections[sid]
        assert sec["heading"].strip() == title, (sid, sec)
        has_results = sid not in NEEDS or (page_path.parent.parent / NEEDS[sid]).exists()
        assert sec["figures"] >= 1 or not has_results, f"section {sid} has no figure"
    assert int(dom.body["data-images"]) == len(raw.images) > 0
    assert dom.body["data-broken"] == "0", f"{dom.body['data-broken']} images failed to load or decode"
    assert all(img["src"].startswith("data:image/png;base64,") for img in dom.images)
    assert shot.shape == (4000, 1400)
    assert shot.std() > 20 and (shot < 200).mean() > 0.01, "the screenshot is blank"
    return dom


# --- campaigns ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    c = make_digits_campaign(tmp_path_factory.mktemp("digits") / "c")
    estimate(c)
    return c


def test_digits_report_shows_images_in_every_section(digits, tmp_path):
    text = make_report(digits)
    dom = check_page(text, digits.paths.report, tmp_path)
    assert dom.sections["gallery"]["thumbs"] == report.GALLERY_SIZE
    pairs = pd.read_parquet(digits.paths.pairs)
    assert len(pairs), "the synthetic twins should give high-influence pairs"
    rows = min(report.PAIR_ROWS, pairs.test.nunique())
    assert dom.sections["influence"]["thumbs"] == rows * (1 + report.INFLUENCERS)
    # the strongest pair's test example comes first, its top influencers beside it, pairs framed
    test, train = int(pairs.test[0]), int(pairs.train[0])
    row = text.split('<div class="pairrow">')[1]
    assert f"<b>test #{test}</b>" in row
    infl = np.load(digits.paths.influence)[:, test]
    selected = set(zip(pairs.train, pairs.test))
    shown = re.findall(r'<div class="card( selected)?"><img[^>]*><div class="cap">#(\d+) label [^<]*(?:<span[^>]*>'
                       r'[^<]*</span>)?<br>infl ([-0-9.]+)', row)
    assert [int(i) for _, i, _ in shown] == np.argsort(-infl, kind="stable")[:report.INFLUENCERS].tolist()
    assert shown[0][1] == str(train) and shown[0][0] == " selected"
    for framed, i, value in shown:
        assert float(value) == pytest.approx(infl[int(i)], abs=6e-4)
        assert bool(framed) == ((int(i), test) in selected)
    # the header: name, status, runs, accuracy and the paper's bound at the folded runs
    summary = json.loads(digits.paths.summary.read_text())
    assert "digits-synth" in text and ">complete<" in text
    assert "40 / 40" in text
    assert f"{summary['test_accuracy']['mean']:.3f} ± {summary['test_accuracy']['std']:.3f}" in text
    assert f"RMS ≤ {summary['error_bound_rms']:.3f} per estimate at 40 runs" in text
    assert "stand on the <b>40 runs</b>" in text
    # the most memorized example leads the gallery, with its estimate ± standard error and counts
    mem = pd.read_parquet(digits.paths.memorization).sort_values("mem", ascending=False, kind="stable")
    top = mem.iloc[0].to_dict()
    assert (f"<b>#{int(top['example'])}</b> label {int(top['label'])}<br>mem {top['mem']:.3f} ± {top['se']:.3f}<br>"
            f"n_in/n_out {int(top['n_in'])}/{int(top['n_out'])}") in text
    # Table 1 and the split-half check from summary.json
    t1 = summary["high_influence_pairs"]
    assert f"<b>digits-synth</b> (40 runs)</td><td>{t1['pairs']:,}</td>" in text
    assert f"{summary['split_half']['memorization_correlation']:.3f}" in text


def test_convergence_is_memorization_over_the_first_runs(digits):
    conv = report.convergence(digits)
    assert conv.runs.tolist() == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert conv.shards == conv.available == 40 and conv.unreadable == 0
    masks = digits.plan.dense()
    correct = np.array([pd.read_parquet(digits.paths.shard(r)).query("split == 'train'").sort_values("example")
                        .correct.to_numpy() for r in range(40)])
    f = conv.followed
    final = reference_memorization(masks[:, f], correct[:, f])["mem"]
    np.testing.assert_allclose(final, pd.read_parquet(digits.paths.memorization).mem.to_numpy()[f])
    for k, mean_abs in zip(conv.runs, conv.mean_abs):
        d = reference_memorization(masks[:k, f], correct[:k, f])["mem"] - final
        assert mean_abs == pytest.approx(np.abs(d[np.isfinite(d)]).mean())
    assert conv.mean_abs[-1] == 0


def test_vector_campaign_in_progress_with_failures(tmp_path):
    c, _ = make_campaign(tmp_path / "vec", runs=40, n_train=60, n_test=20)
    for r in range(30, 40):  # 30 of 40 runs done; four of the others failed, for two reasons
        c.paths.shard(r).unlink()
    for r, why in ((31, "CUDA out of memory at step 12"), (32, "CUDA out of memory at step 40"),
                   (33, "CUDA out of memory at step 7"), (35, "its worker died 3 times")):
        record_failure(c, r, why, "Traceback ...", host="node-1")
    estimate(c, complete=False)
    assert json.loads(c.paths.summary.read_text())["complete"] is False
    text = make_report(c)
    dom = check_page(text, c.paths.report, tmp_path)
    assert "in progress: 30 of 40 runs" in text and "30 / 40" in text
    # failures, by reason with numbers folded, and their count; the first run's values shown (issue 12)
    assert "<td>CUDA out of memory at step 12 (numbers vary; shown: run 31)</td><td>3</td>" in text
    assert "<td>its worker died 3 times</td><td>1</td>" in text
    assert "4 runs with a failure record in failed/" in text
    # vectors: tables, not images; the only images are the plots
    assert "are not images; tables instead" in text
    assert all(s["thumbs"] == 0 for s in dom.sections.values())
    mem = pd.read_parquet(c.paths.memorization).sort_values("mem", ascending=False, kind="stable")
    assert f"<td>{int(mem.example.iloc[0])}</td>" in text
    # the split-half check is written at the end of a campaign only, and the page says so
    assert "split-half consistency: not computed" in text


@pytest.mark.parametrize("mode", ["topk", "per-class"])
def test_topk_and_per_class_influence(tmp_path, mode):
    c, _ = make_campaign(tmp_path / mode, mode=mode, runs=40)
    estimate(c)
    text = make_report(c)
    pairs = pd.read_parquet(c.paths.pairs)
    selected = set(zip(pairs.train, pairs.test))
    test, train = int(pairs.test[0]), int(pairs.train[0])
    # the strongest pair's test example, with its top influencers read from the mode's own file
    section = text.split('<section id="influence">')[1].split("</section>")[0]
    row = re.search(rf"<tr><td>{test}</td>.*?</tr>", section, re.S).group(0)
    if mode == "topk":
        top = pd.read_parquet(c.paths.estimates_dir / "influence_topk.parquet").query(f"test == {test}")
        expected = list(zip(top.sort_values("rank").train, top.sort_values("rank").infl))
    else:
        z = np.load(c.paths.estimates_dir / "influence_per_class.npz")
        k = int(pairs.label[0])
        col = z[f"infl_matrix_class{k}"][:, np.flatnonzero(z[f"tt_classidx_{k}"] == test)[0]]
        order = np.argsort(-col, kind="stable")[:report.INFLUENCERS]
        expected = list(zip(z[f"tr_classidx_{k}"][order], col[order]))
    shown = re.findall(r"(\d+) \(label [^)]*\): infl ([-0-9.]+) ± [0-9.]+, mem [-0-9.]+( ●)?", row)
    assert [(int(i), float(v)) for i, v, _ in shown] == [(int(i), pytest.approx(v, abs=6e-4)) for i, v in expected]
    assert [bool(mark) for *_, mark in shown] == [(int(i), test) in selected for i, _ in expected]
    assert train in [int(i) for i, _, _ in shown]


def test_images_that_cannot_be_loaded_become_tables(digits, monkeypatch):
    import workers.datasets

    def unavailable(section):
        raise FileNotFoundError("no such file: /data/digits")

    monkeypatch.setattr(workers.datasets, "load_dataset", unavailable)
    text = make_report(digits)
    assert "the images could not be loaded (FileNotFoundError: no such file: /data/digits); tables instead" in text
    assert 'class="thumb' not in text
    assert "<th>test example</th>" in text  # the influence rows as a table


def test_a_campaign_without_runs_yet(tmp_path):
    c = make_digits_campaign(tmp_path / "new", written=0)
    text = make_report(c)
    assert "no estimates yet: 0 of 40 runs have a shard" in text
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text
    assert "fewer than 10 shards" in text and "no finished run yet" in text


def test_shards_before_the_first_checkpoint(tmp_path):
    c = make_digits_campaign(tmp_path / "early", written=12)  # shards on disk, nothing folded yet
    text = make_report(c)
    assert "no estimates yet: 12 of 40 runs have a shard" in text
    assert "runs read from the shards" in text  # convergence needs only the shards
    assert "Test accuracy of 12 runs (from the shards' metadata)" in text


def test_no_pair_shows_the_strongest_influences_and_mode_none_says_so(tmp_path):
    c, _ = make_campaign(tmp_path / "strict", runs=40)
    text = c.paths.spec.read_text().replace("mem_threshold = 0.1013", "mem_threshold = 1.5")
    c.paths.spec.write_text(text)  # a threshold no estimate reaches: no pair
    c = create_or_open(None, c.paths.root, load_data=False)
    estimate(c)
    assert len(pd.read_parquet(c.paths.pairs)) == 0
    page = make_report(c)
    infl = np.load(c.paths.influence)
    first = int(np.argsort(-infl.max(axis=0), kind="stable")[0])
    assert "No pair passes the selection; shown instead: the 10 test examples" in page
    section = page.split('<section id="influence">')[1]
    assert re.search(r"<tbody><tr><td>(\d+)</td>", section).group(1) == str(first)
    none, _ = make_campaign(tmp_path / "none", runs=12, mode="none")
    estimate(none)
    assert 'does not estimate influence (<code>[estimates] influence = "none"</code>)' in make_report(none)


def test_a_directory_that_is_not_a_campaign(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])  # through the group: its one error handler
    assert r.exit_code == 2 and "is not a campaign directory" in r.output


def test_pictures_rescale_for_display():
    assert report.image_shape({"input_shape": [1, 8, 8]}) == (1, 8, 8)
    assert report.image_shape({"input_shape": [3, 32, 32]}) == (3, 32, 32)
    assert report.image_shape({"input_shape": [28, 28]}) == (1, 28, 28)
    assert report.image_shape({"input_shape": [64], "info": {"image_shape": [8, 8]}}) == (1, 8, 8)
    assert report.image_shape({"input_shape": [32]}) is None
    # CIFAR normalized per channel: the normalization is undone, channels go last
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.2]
    raw = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    x = (raw - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    pics = report.Pictures(x, x, (3, 4, 4), {"normalization": {"mean": mean, "std": std}})
    np.testing.assert_allclose(pics.pixels("train", 1), raw[1].transpose(1, 2, 0), atol=1e-6)
    assert pics.uri("test", 0).startswith("data:image/png;base64,iVBORw0KGgo")
    # anything else outside [0, 1] is stretched to it; a PNG data URI comes back
    pics = report.Pictures(np.array([[[[-3.0, 5.0], [1.0, 0.0]]]]), np.zeros((1, 1, 2, 2)), (1, 2, 2), {})
    np.testing.assert_allclose(pics.pixels("train", 0), [[0, 1], [0.5, 0.375]])
    assert pics.uri("train", 0).startswith("data:image/png;base64,iVBORw0KGgo")


def test_many_examples_draw_a_2d_histogram():
    rng = np.random.default_rng(0)
    n = report.SCATTER_LIMIT + 1
    img = report.draw_in_vs_heldout(rng.random(n), rng.random(n), runs=10, threshold=0.25)
    assert img.startswith('<img class="plot" src="data:image/png;base64,')


def test_utility_results_are_drawn(digits, tmp_path):
    """With DIR/utility/utility.parquet (what `longtail utility` writes; tests/test_followup.py runs it
    for real), the report draws the paper's Fig. 2 and tabulates every condition."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "copy"
    shutil.copytree(digits.paths.root, root)
    (root / "utility").mkdir()
    pq.write_table(pa.table({
        "name": ["full", "memorized-0.25", "random-0.25"], "kind": ["full", "memorized", "random"],
        "threshold": [np.nan, 0.25, 0.25], "removed": [0, 12, 12], "removed_share": [0.0, 0.1, 0.1],
        "runs": [3, 3, 3], "acc_mean": [0.9, 0.8, 0.88], "acc_se": [0.01, 0.01, 0.01],
        "drop": [0.0, 0.1, 0.02], "drop_se": [np.nan, 0.014, 0.014]}), root / "utility" / "utility.parquet")
    page = root / "report" / "index.html"
    r = CliRunner().invoke(main, ["report", str(root)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = page.read_text()
    dom = check_page(text, page, tmp_path)
    assert dom.sections["utility"]["figures"] >= 2
    assert "memorized-0.25" in text and "10.00 ± 1.40" in text and "2.00 ± 1.40" in text
