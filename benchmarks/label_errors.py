"""Label errors told apart from rare examples, and proxies checked against memorization: measured.

    .venv/bin/python benchmarks/label_errors.py mixture [--runs 200]
    .venv/bin/python benchmarks/label_errors.py digits [--runs 200]
    .venv/bin/python benchmarks/label_errors.py mnist-5k [--runs 100]

Each trains a campaign with [train] store = ["margin", "dynamics"] through longtail's own worker code
(workers.worker.RunWorker, packed where the model allows; in this process, without Ray: the numbers do
not depend on the scheduler), folds it with orchestrator.fold and writes estimates/ with
orchestrator.estimates_files, then reads the estimates files back:

- mixture: longtail-mixture (2,000 training examples, 400 Zipf subpopulations) with 100 planted wrong
  labels (5%), an MLP 32-256-10 trained with Adam (the recipe of tests/test_campaign.py, which memorizes
  planted labels). The "likely mislabeled" score of triage.parquet (the share of
  out-of-subset predictions on the best class other than the label) is scored by its AUROC against
  the planted set; the examples triaged "mislabeled" by their precision and recall. Beside it,
  cleanlab.filter.find_label_issues(labels, pred_probs) on longtail's exported estimates/pred_probs.npy
  (and the AUROC of cleanlab's label-quality score), and how the memorized examples of singleton
  subpopulations (rare, correctly labelled) were triaged.
- digits (the demo's spec) and mnist-5k (recipe mnist-mlp): the agreement table of the proxies.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from importlib import resources

import numpy as np
import pyarrow.parquet as pq

from estimators import triage as tr
from orchestrator.features import proxies
from orchestrator import spec as specs
from orchestrator.fold import Aggregator
from orchestrator.campaign import create_or_open
from orchestrator.estimates_files import write_estimates
from workers.recipes import recipe_spec
from workers.worker import RunWorker

MIXTURE = """
[campaign]
name = "label-errors"
runs = 2
seed = 0
subset_ratio = 0.7
[dataset]
name = "longtail-mixture"
n_train = 2000
n_test = 1000
mislabeled = 100
[model]
name = "mlp"
hidden = [256]
[train]
optimizer = "adam"
lr = 0.01
epochs = 30
batch_size = 64
weight_decay = 0.0
store = ["margin", "dynamics"]
[estimates]
influence = "none"
"""

MNIST5K = """
[campaign]
name = "mnist-5k-proxies"
runs = 2
seed = 0
subset_ratio = 0.7
[dataset]
name = "mnist-5k"
[estimates]
influence = "none"
"""


def spec_for(name: str, runs: int) -> specs.Spec:
    if name == "mixture":
        spec = specs.loads(MIXTURE, "label_errors.py")
    elif name == "digits":
        spec = specs.loads(resources.files("orchestrator").joinpath("demo.toml").read_text(), "demo.toml")
    else:
        text = MNIST5K + recipe_spec("mnist-mlp").replace('precision = "fp32"\n',
                                                          'precision = "fp32"\nstore = ["margin", "dynamics"]\n')
        spec = specs.loads(text, "label_errors.py")
    return spec.replace(campaign=dataclasses.replace(spec.campaign, runs=runs))


def train_campaign(spec: specs.Spec, root: str, pack: int = 16):
    c = create_or_open(spec, root)
    w = RunWorker(spec.to_dict(), c.name, spec.result_hash(), c.fingerprint)
    calls = [(r, np.packbits(c.plan.mask(r)), int(c.plan.seeds[r]), str(c.paths.shard(r))) for r in range(c.plan.runs)]
    start = time.perf_counter()
    for i in range(0, len(calls), pack):
        for res in w.run_many(calls[i:i + pack]):
            if res.failed:
                raise SystemExit(f"run {res.run} failed: {res.reason}")
    seconds = time.perf_counter() - start
    agg = Aggregator(c, from_scratch=True)
    for r in range(c.plan.runs):
        agg.add(r, agg.read(r))
    summary = write_estimates(agg, complete=True)
    return c, summary, seconds


def agreement(c) -> None:
    rows = proxies.read_agreement(c.paths)
    print("agreement with memorization (each proxy averaged over the first RUNS runs), 95% bootstrap CI:")
    for line in proxies.format_table(rows):
        print("  " + line)


def label_errors(c, summary: dict) -> None:
    import cleanlab
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    t = pq.read_table(c.paths.estimates_dir / "triage.parquet").to_pandas()
    info = c.dataset.info
    n = c.n_train
    planted = np.zeros(n, bool)
    planted[info["mislabeled"]] = True
    score = np.nan_to_num(t["mislabeled_score"].to_numpy(), nan=0.0)
    e = c.spec.estimates
    # the flag over all training examples (the triage rule without the memorization condition) ...
    flagged = (t["mode"].to_numpy() != t["label"].to_numpy()) & (t["mode_share"].to_numpy() >= e.triage_agree)
    # ... and the triage of the memorized examples
    triaged = t["triage"].to_numpy() == "mislabeled"
    labels = c.labels["train_labels"]
    pred_probs = np.load(c.paths.estimates_dir / "pred_probs.npy", allow_pickle=False)
    issues = find_label_issues(labels, pred_probs)
    quality = get_label_quality_scores(labels, pred_probs)

    def pr(sel):
        tp = int((sel & planted).sum())
        return f"{int(sel.sum())} flagged, precision {tp / max(1, sel.sum()):.3f}, recall {tp / planted.sum():.3f}"

    print(f"planted wrong labels: {int(planted.sum())} of {n} training examples "
          f"({planted.mean():.0%}); {summary['runs']['folded']} runs")
    print(f"  longtail         : AUROC of the mislabeled score {tr.auroc(score, planted):.3f}; out-of-subset mode "
          f"not the label with share >= {e.triage_agree:g}: {pr(flagged)}")
    print(f"  longtail triage  : of the {int((t['triage'].to_numpy() != '').sum())} memorized examples (mem >= "
          f"{e.triage_mem:g}), 'mislabeled': {pr(triaged)}; planted examples memorized: "
          f"{int((planted & (t['triage'].to_numpy() != '')).sum())}")
    print(f"  cleanlab {cleanlab.__version__:<8}: AUROC of 1 - label quality {tr.auroc(-quality, planted):.3f}; "
          f"find_label_issues on longtail's pred_probs: {pr(issues)}")
    groups = c.dataset.train_groups
    sizes = np.bincount(groups)
    single = (sizes[groups] == 1) & ~planted
    memorized = t["triage"].to_numpy() != ""
    cats = {k: int(((t["triage"].to_numpy() == k) & single).sum()) for k in tr.CATEGORIES}
    print(f"  rare examples (singleton subpopulations, correct labels): {int(single.sum())}, of which "
          f"{int((single & memorized).sum())} memorized and triaged {cats}; "
          f"cleanlab flags {int((issues & single).sum())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=("mixture", "digits", "mnist-5k"))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--keep", default="", help="train into this directory and keep it (default: a temporary one)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = a.keep or tempfile.mkdtemp(prefix="lt-label-errors-")
    try:
        c, summary, seconds = train_campaign(spec_for(a.dataset, a.runs), f"{out}/c" if not a.keep else out)
        acc = summary["test_accuracy"]
        print(f"# {a.dataset}: {a.runs} runs trained in {seconds:.1f} s, test accuracy {acc['mean']:.3f} ± "
              f"{acc['std']:.3f}; memorization mean {summary['memorization']['mean']:.3f}")
        if a.dataset == "mixture":
            label_errors(c, summary)
        agreement(c)
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
