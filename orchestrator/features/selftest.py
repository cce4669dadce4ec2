"""`longtail selftest [--address ADDR]`: before a costly campaign, run a small one on the same cluster with a
learner whose memorization and influence are known exactly (workers/selftest_learner.py, closed form in
estimators/closed_form.py), and check the whole path: scheduling on every node, shards, fold, estimates.

Checks (each PASS or FAIL with what was found):
- runs:      every planned run has a verified shard and none failed;
- nodes:     every alive node of the cluster with CPUs trained at least one run;
- fold:      the checkpoint's statistics equal a refold of the shards from scratch;
- estimates: estimates/ (memorization, influence) equals what the shards give;
- memorization, influence: the estimates' 95% intervals cover the exact values at least COVERAGE of the
  time and no estimate is further than MAX_Z standard errors from its exact value;
- privacy risk: the learner's planted leaky examples have the highest membership risk.

The campaign is deterministic (fixed seeds, a deterministic learner), so on a healthy system the same
numbers come out everywhere; the thresholds were set with room: on a healthy run coverage is about 95%.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from estimators import closed_form as cf
from estimators import estimates as est
from estimators.stats import CORRECT
from workers.errors import LongtailError

from orchestrator import spec as specs

COVERAGE = 0.85
MAX_Z = 5.0
LEAKY = (4, 5, 10)

SPEC = """
[campaign]
name = "selftest"
seed = 0
runs = {runs}
subset_ratio = 0.5
design = "fixed"
[dataset]
name = "workers.selftest_learner:dataset"
n_train = 60
n_test = 30
leaky = {leaky}
[model]
name = "mlp"
[train]
trainer = "workers.selftest_learner:fit_predict"
store = ["margin"]
[estimates]
influence = "dense"
split_half = false
"""


class SelftestFailed(LongtailError):
    exit_code = 1


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def selftest_spec(runs: int = 400) -> specs.Spec:
    return specs.loads(SPEC.format(runs=runs, leaky=list(LEAKY)), "selftest.toml")


def _covered(estimate, se, low, high, truth) -> tuple[float, float, int]:
    """Share of intervals covering the truth, the largest |z|, and how many estimates are defined."""
    ok = np.isfinite(estimate)
    z = np.abs(estimate[ok] - truth[ok]) / np.maximum(se[ok], 1e-12)
    inside = (low[ok] <= truth[ok]) & (truth[ok] <= high[ok])
    return float(inside.mean()) if ok.any() else 0.0, float(z.max()) if ok.any() else np.inf, int(ok.sum())


def _against_truth(name: str, estimate, se, low, high, truth) -> Check:
    cover, zmax, n = _covered(estimate, se, low, high, truth)
    ok = n == truth.size and cover >= COVERAGE and zmax <= MAX_Z
    return Check(name, ok, f"{cover:.1%} of {n} 95% intervals cover the exact value (need >= {COVERAGE:.0%}), "
                           f"largest error {zmax:.1f} standard errors (need <= {MAX_Z:g})"
                 + ("" if n == truth.size else f"; only {n} of {truth.size} estimates are defined"))


def check(campaign_dir, nodes: set[str] | None = None) -> list[Check]:
    """The checks on a finished self-test campaign directory (estimates/ as written, shards as stored)."""
    from orchestrator.fold import Aggregator
    from orchestrator.campaign import create_or_open
    from orchestrator.driver import RunReport, fold_existing

    c = create_or_open(None, campaign_dir, load_data=False)
    checks = []
    finished, failed = c.finished_runs(), c.failed_runs()
    checks.append(Check("runs", len(finished) == c.plan.runs and not failed,
                        f"{len(finished)}/{c.plan.runs} shards, {len(failed)} failed runs"
                        + (f" ({c.failure_reasons()})" if failed else "")))
    saved = Aggregator(c)
    fresh = Aggregator(c, from_scratch=True)
    report = RunReport(planned=c.plan.runs, already_done=0)
    fold_existing(c, fresh, report)
    fresh.flush()
    checks.append(Check("shards verified", not report.rejected,
                        f"{len(report.rejected)} shards failed verification: {report.rejected[:5]}"
                        if report.rejected else f"{fresh.stats.runs} shards read and verified"))
    if nodes is not None:
        hosts = set()
        from workers.shard import read_meta

        for r in sorted(finished):
            hosts.add(read_meta(c.paths.shard(r)).get("node", ""))
        missing = sorted(nodes - hosts)
        checks.append(Check("nodes", not missing, f"{len(nodes & hosts)} of the cluster's {len(nodes)} nodes with CPUs trained runs"
                            + (f"; no run on {missing}" if missing else "")))
    a, b = saved.stats, fresh.stats
    same = a.runs == b.runs and np.array_equal(a.n_in, b.n_in) and all(
        np.array_equal(getattr(a.targets[CORRECT], k), getattr(b.targets[CORRECT], k))
        for k in ("train", "train_in", "test", "infl_in"))
    same_risk = all(np.allclose(getattr(saved.risk, k), getattr(fresh.risk, k), rtol=1e-9, atol=1e-6)
                    for k in ("count_in", "count_out", "sum_in", "sum_out", "sq_in", "sq_out"))
    checks.append(Check("fold", same and same_risk, f"checkpoint holds {a.runs} runs, the shards {b.runs}; "
                        + ("sums identical" if same and same_risk else "their sums differ")))
    m = est.memorization(fresh.stats)
    written = pq.read_table(c.paths.memorization).to_pandas().sort_values("example")
    infl = est.influence(fresh.stats)
    written_infl = np.load(c.paths.influence, allow_pickle=False)
    agree = (np.allclose(written["mem"].to_numpy(), m.mem, atol=1e-9, equal_nan=True)
             and np.allclose(written["se"].to_numpy(), m.se, atol=1e-9, equal_nan=True)
             and np.allclose(written_infl, infl.est, atol=1e-5, equal_nan=True))
    checks.append(Check("estimates", agree, "estimates/ equals the estimates from the shards" if agree else
                        f"estimates/ differs from the shards: memorization by up to "
                        f"{np.nanmax(np.abs(written['mem'].to_numpy() - m.mem)):.3g}, influence by up to "
                        f"{np.nanmax(np.abs(written_infl - infl.est)):.3g}"))
    info = c.labels  # the truth needs the learner's constants: rebuild its dataset (cheap, no files)
    from workers.selftest_learner import dataset, mu_in

    d = dataset(c.spec.dataset.as_dict())
    if not np.array_equal(d.y_train, info["train_labels"]):
        raise SelftestFailed(f"{c.paths.root} is not a self-test campaign: its labels differ from the learner's")
    p = d.info["learner"]
    m_size = int(c.plan.subset_sizes()[0])
    truth = cf.selftest_truth(c.n_train, c.n_test, m_size, mu_in(d.info, c.n_train), p["mu_hi"], p["mu_lo"],
                              p["nu_hi"], p["nu_lo"], p["offset"])
    mem_file = written["mem"].to_numpy()
    checks.append(_against_truth("memorization", mem_file, written["se"].to_numpy(), written["ci_low"].to_numpy(),
                                 written["ci_high"].to_numpy(), truth.mem))
    checks.append(_against_truth("influence", written_infl, infl.se, infl.ci_low, infl.ci_high, truth.infl))
    risk_path = c.paths.privacy_risk
    if risk_path.exists():
        risk = pq.read_table(risk_path).to_pandas().sort_values("example")["risk"].to_numpy()
        top = set(np.argsort(-np.nan_to_num(risk, nan=-1))[:len(p["leaky"])].tolist())
        checks.append(Check("privacy risk", top == set(p["leaky"]),
                            f"highest risk at {sorted(top)}, planted leaky examples {p['leaky']}"))
    else:
        checks.append(Check("privacy risk", False, f"{risk_path} was not written"))
    return checks


def _cluster_nodes(ray) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}


def run_selftest(address: str | None = None, out: str | None = None, runs: int = 400, say=print) -> tuple[list[Check], Path]:
    """Run the self-test campaign (in `out`, or a temporary directory) on the cluster at `address`."""
    from orchestrator.campaign import create_or_open
    from cluster.connect import ray_init
    from orchestrator.driver import run_campaign

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="longtail-selftest-")) / "campaign"
    if root.exists() and any(root.iterdir()):
        raise LongtailError(f"selftest: {root} exists and is not empty; give --out a new directory")
    ray, owned, _ = ray_init(address)
    try:
        nodes = _cluster_nodes(ray)
        say(f"selftest: {runs} runs of a learner with known memorization and influence on {len(nodes)} node(s); "
            f"campaign directory {root}")
        start = time.monotonic()
        c = create_or_open(selftest_spec(runs), root)
        run_campaign(c, address=address, progress=False)
        say(f"selftest: campaign finished in {time.monotonic() - start:.1f} s")
    finally:
        if owned:
            ray.shutdown()
    return check(root, nodes), root
