"""Run by tests/test_foldpool.py in its own process (the test session already holds a Ray): live
campaigns with `[resources] fold_actors = 3` on a three-node Ray cluster on this machine
(ray.cluster_utils.Cluster, one CPU a node, one fold actor each). The runs "train" in the driver's
process (an InProcessExecutor whose calls copy the shards of a synthetic reference campaign into
place), so the campaign's fold is the only work on the cluster.

0. On that cluster, tests/foldpool_cluster.py's checks of `longtail estimate --fold-actors` on the
   campaign REFOLD_DIR (one cluster start for all of tests/test_foldpool.py).
1. A child driver (a process of its own, connected to the same cluster) runs a campaign and is
   SIGKILLed while its fold actors hold runs not yet merged.
2. This process resumes it with fold actors; the shard of run DAMAGED comes back truncated. The
   fold (state/fold.npz) and estimates/ are compared with the driver's own fold of the same shards.

Prints one JSON line. Usage: python foldpool_live.py WORKDIR REFOLD_DIR | child WORKDIR ADDRESS"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNS, DAMAGED = 24, 20
CHECKPOINTED = {"done": False}  # in the child: one checkpoint has merged the actors' first folds


def exact(key: str) -> bool:
    """Checkpoint arrays the actors must reproduce bit for bit: everything but soft sums (the margin
    target, privacy-risk sums, proxies' float32 sums), which add in another order."""
    return not (".margin." in key or key.startswith("risk.") or key.endswith("dyn.sums"))


def compare(a: dict, b: dict) -> dict:
    keys = sorted(set(a) | set(b))
    differ = [k for k in keys if k not in a or k not in b or a[k].shape != b[k].shape
              or not (np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") if exact(k) else
                      np.allclose(a[k], b[k], rtol=1e-10, atol=1e-9, equal_nan=True))]
    rounded = [k for k in keys if k not in differ and not exact(k) and not np.array_equal(a[k], b[k], equal_nan=True)]
    return {"differ": differ, "rounding_only": rounded, "compared": len(keys)}


def estimates_equal(root: Path, reference: Path) -> list[str]:
    """estimates/ files (Parquet columns, .npy) that differ beyond rounding (exact but for soft columns)."""
    import pyarrow.parquet as pq

    from orchestrator.paths import CampaignPaths

    bad = []
    for f in sorted(Path(CampaignPaths(reference).estimates_dir).iterdir()):
        g = Path(CampaignPaths(root).estimates_dir) / f.name
        if f.suffix == ".parquet":
            x, y = pq.read_table(f), pq.read_table(g)
            for name in x.column_names:
                u, v = x.column(name).to_numpy(), y.column(name).to_numpy()
                soft = "margin" in name or f.name.startswith(("privacy_risk", "proxies"))
                ok = (np.allclose(u, v, rtol=1e-6, atol=1e-9, equal_nan=True) if soft and u.dtype.kind == "f"
                      else np.array_equal(u, v, equal_nan=u.dtype.kind == "f"))
                if not ok:
                    bad.append(f"{f.name}:{name}")
        elif f.suffix == ".npy":
            if not np.array_equal(np.load(f), np.load(g), equal_nan=True):
                bad.append(f.name)
    return bad


def executor(reference, damaged: int | None = None, kill_at: bool = False, runs_box: list | None = None):
    """Workers in this process: each call copies the reference shards of its runs into place."""
    from orchestrator.dispatch import InProcessExecutor
    from workers.results import WorkerResult

    calls = [0]

    def run_many(batch):
        calls[0] += 1
        live = runs_box[0].live if kill_at else None
        if live is not None and live.verifying:  # the verdicts on earlier runs are in before more runs come
            import ray

            ray.wait(list(live.verifying), num_returns=len(live.verifying), timeout=60)
        if live is not None and CHECKPOINTED["done"]:
            if live.acc:  # runs the actors were told to fold, not yet merged
                print(json.dumps({"killed_at_call": calls[0], "unmerged": sorted(live.owner),
                                  "folded_in_actors": sorted(live.acc)}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        out = []
        for run, _mask, seed, path in batch:
            src = reference.paths.shard(run)
            if run == damaged:
                Path(path).write_bytes(src.read_bytes()[:300])
            else:
                shutil.copyfile(src, path)
            out.append(WorkerResult(run=run, seed=seed, host="in-process", node="", pid=os.getpid(), device="cpu",
                                    train_seconds=0.0, test_acc=0.5, train_acc_in=1.0, train_acc_out=0.5,
                                    final_loss=0.0, finished_at=time.time()))
        return out

    return InProcessExecutor(run_many, workers=2)


def patch_driver(reference, **kw) -> list:
    """driver._dispatch trains on in-process workers; returns a box holding the CampaignRuns."""
    from orchestrator import driver

    box = []
    init = driver.CampaignRuns.__init__

    def capture(self, *a, **k):
        init(self, *a, **k)
        box[:] = [self]

    driver.CampaignRuns.__init__ = capture

    def dispatch(campaign, agg, todo, done, report, address, show_progress, lock, dashboard_host, gate):
        driver.train(campaign, executor(reference, runs_box=box, **kw), agg, todo, done, report, False, lock, gate,
                     metrics=False)

    driver._dispatch = dispatch
    return box


def open_like(reference, root: Path, checkpoint_seconds: float = 1e-3):
    """A campaign of the reference's spec (results) with fold actors (and by default a checkpoint, so a
    merge, every time round the driver's loop)."""
    import dataclasses

    from orchestrator.campaign import create_or_open

    spec = reference.spec
    spec = spec.replace(resources=dataclasses.replace(spec.resources, fold_actors=3, pack=2),
                        estimates=dataclasses.replace(spec.estimates, checkpoint_seconds=checkpoint_seconds))
    assert spec.result_hash() == reference.spec.result_hash()  # resources keys stay out of the spec hash
    return create_or_open(spec, root)


def reference_fold(reference, leave_out=()):
    from orchestrator.fold import Aggregator

    agg = Aggregator(reference, from_scratch=True)
    for r in range(reference.plan.runs):
        if r not in leave_out:
            agg.add(r, agg.read(r))
    agg.flush()
    return agg


def checkpoint(root: Path) -> dict:
    from orchestrator.paths import CampaignPaths

    with np.load(CampaignPaths(root).checkpoint, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def child(work: str, address: str) -> None:
    import ray

    from orchestrator.campaign import create_or_open
    from orchestrator.driver import run_campaign

    ray.init(address=address, log_to_driver=False)
    work = Path(work)
    reference = create_or_open(None, work / "ref", load_data=False)
    patch_driver(reference, kill_at=True)
    from orchestrator import driver

    tick = driver.CampaignRuns.tick

    def one_checkpoint(self, dispatcher):  # checkpoint_seconds is an hour: one checkpoint, once actors fold
        tick(self, dispatcher)
        if not CHECKPOINTED["done"] and self.live is not None and self.live.acc:
            self.last_checkpoint = -1e9
            tick(self, dispatcher)
            CHECKPOINTED["done"] = True

    driver.CampaignRuns.tick = one_checkpoint
    run_campaign(create_or_open(None, work / "killed"), progress=False)
    print(json.dumps({"not_killed": True}), flush=True)


def main(work: str, refold: str) -> None:
    import ray

    from foldpool_cluster import checks, start_cluster
    from orchestrator.campaign import create_or_open
    from orchestrator.driver import run_campaign
    from orchestrator.estimates_files import write_estimates
    from orchestrator.fold import Aggregator
    from orchestrator.paths import CampaignPaths
    from synthetic import make_campaign

    work = Path(work)
    t0 = time.monotonic()
    reference, _ = make_campaign(work / "ref", runs=RUNS, mode="topk", soft='["margin"]')
    out = {"t": {}}

    def lap(name):
        out["t"][name] = round(time.monotonic() - t0, 1)
    cluster = start_cluster()
    try:
        lap("cluster")
        out["refold"] = checks(refold, cluster)  # `longtail estimate --fold-actors 3`; connects this process
        lap("refold")
        out["nodes"] = sum(n["Alive"] for n in ray.nodes())

        # a driver SIGKILLed while its actors hold unmerged runs
        open_like(reference, work / "killed", checkpoint_seconds=3600.0)
        r = subprocess.run([sys.executable, __file__, "child", str(work), cluster.address], env=dict(os.environ),
                           capture_output=True, text=True, timeout=180)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        out["child"] = lines[-1] if lines else {"rc": r.returncode, "stderr": r.stderr[-2000:]}
        out["child_rc"] = r.returncode
        lap("child")
        killed = CampaignPaths(work / "killed")
        before = checkpoint(killed.root) if killed.checkpoint.exists() else None
        out["folded_at_kill"] = int(before["folded"].sum()) if before is not None else 0
        out["shards_at_kill"] = len(list(killed.runs_dir.glob(killed.SHARD_GLOB)))

        # the resume, with fold actors: run DAMAGED's shard comes back truncated
        reads = [0]
        read = Aggregator.read

        def counted(self, run):
            reads[0] += 1
            return read(self, run)

        Aggregator.read = counted
        patch_driver(reference, damaged=DAMAGED)
        report = run_campaign(create_or_open(None, killed.root), progress=False)
        Aggregator.read = read
        out["driver_reads"] = reads[0]  # the runs the checkpoint lacked, refolded before the actors start
        out["resumed_already_done"] = report.already_done
        out["resumed_trained"] = report.trained
        out["rejected"], out["failed"] = report.rejected, report.failed
        after = checkpoint(killed.root)
        ref = reference_fold(reference, leave_out={DAMAGED})
        out["fold"] = compare(after, ref.checkpoint_arrays())
        out["folded"] = int(after["folded"].sum())
        out["runs_counted"] = int(after["group0.runs"])
        ref_dir = work / "ref_estimates"
        shutil.copytree(reference.paths.root, ref_dir)
        ref.c = create_or_open(None, ref_dir, load_data=False)
        write_estimates(ref, complete=False, final=True)
        out["estimates_differ"] = estimates_equal(killed.root, ref_dir)
        lap("resume")
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
