"""`longtail plan`: what a campaign will cost, measured before it is launched.

A short pilot campaign (the spec with `runs = --pilot`, same dataset, recipe and [resources], in a
temporary directory that is deleted afterwards) runs on the target cluster (the embedded local Ray,
or --address). From it:

    seconds per run   one warm worker's time per run: from each pilot worker with two calls or more, its
                      runs after the first call over their time (steady_timing); a pilot too short for
                      that falls back to training wall time x workers it used / runs it trained
    throughput        workers the cluster fits / seconds per run
    wall time         planned runs / throughput + the first call's warm-up + the pilot's start-up (Ray,
                      workers, final estimates)
    compute           wall x workers x gpus_per_worker GPU-hours (or x cpus_per_worker CPU core-hours)
    storage           pilot bytes per shard x planned runs + plan + estimates (+ dense influence,
                      2 x 4 x n_train x n_test bytes per target when the influence mode is dense) +
                      the fold checkpoint (its exact size: orchestrator/fold.py fixed_sizes)
    precision         the paper's bound (estimators.estimates.error_bound) at the planned runs, and the
                      expected plug-in standard error of every memorization estimate,
                      se_i(t) = sqrt(p_in(1 - p_in) / (q t) + p_out(1 - p_out) / ((1 - q) t)),
                      with p_in, p_out the pilot's in- and held-out accuracy of example i and q the
                      share of runs that train on an example (the subset ratio; 1/2 for paired),
                      over examples: median and 90th percentile; and the runs each target needs.

Numbers are pure functions (the precision and storage ones in estimators/precision.py, the time ones below);
Ray and files stay in `measure_pilot` and the command.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from estimators.estimates import error_bound
# the precision and storage numbers (imported from here by tests and callers of the plan)
from estimators.precision import (degenerate_share, expected_se, in_share, main_ratio_runs,  # noqa: F401
                                  runs_for_bound, runs_for_se, storage_bytes, variance_per_run)

from orchestrator import spec as specs
from orchestrator.campaign import CampaignError
from orchestrator.failures import first_reason
from orchestrator.pool import runs_per_call
from orchestrator.progress import format_bytes, format_seconds

DEFAULT_TARGET_SE = 0.05


class PilotError(CampaignError):
    """The pilot could not measure anything; says why (the first failure) and what to try."""


# --- numeric parts (pure; precision and storage in estimators/precision.py) ------------------------


def seconds_per_run(training_seconds: float, workers_used: int, trained: int) -> float:
    """One worker's wall time per run: the pilot kept `workers_used` workers busy for
    `training_seconds` and finished `trained` runs."""
    return training_seconds * max(1, workers_used) / trained


def steady_timing(finished: dict, first_dispatch: float, pack: int, workers: int | None = None) -> dict:
    """The pilot's pace once its workers are warm, from when each shard was finished (`finished`: worker ->
    its shards' finish times, seconds on the clock of `first_dispatch`, the pilot's first call).

    A worker's first call carries its one-off costs (the first forward and backward pass allocates and
    warms up, the first shard write imports its writer), and the workers do not all start at once (the
    first call goes out when the first worker is ready; the others are still importing torch and loading
    the data). Seconds per run over a pilot of a few calls (training seconds x workers / runs) carries
    both and overstated a long campaign's by up to 3x. Measured instead:
    - per worker with at least two calls, its runs after the first call over the time from the end of its
      first call to its last shard (calls 2..n exactly): one warm worker's runs/s (the median over them);
    - each worker's first call's end; a worker of the `workers` the campaign will have that finished no call
      in the pilot counts as ending it at the pilot's last shard (a lower bound: it was not ready sooner).
    The campaign's training time is then mean(first call ends) + (runs - workers x pack) / (workers x rate):
    every worker trains at the warm rate once its first call is done. `warmup_seconds` is what that adds
    to runs / (workers x rate). Returns {"runs_per_second_per_worker", "warmup_seconds", "workers_timed",
    "first_call_seconds"}; the rate is None when no worker finished two calls."""
    rates, firsts = [], []
    for times in finished.values():
        ts = sorted(times)
        k = min(pack, len(ts))
        firsts.append(ts[k - 1] - first_dispatch)
        if len(ts) > k and ts[-1] > ts[k - 1]:
            rates.append((len(ts) - k) / (ts[-1] - ts[k - 1]))
    last = max((t for ts in finished.values() for t in ts), default=first_dispatch) - first_dispatch
    firsts += [last] * max(0, (workers or len(firsts)) - len(firsts))
    rate = float(np.median(rates)) if rates else None
    warm = max(0.0, float(np.mean(firsts)) - pack / rate) if rate and firsts else 0.0
    return {"runs_per_second_per_worker": rate, "warmup_seconds": warm, "workers_timed": len(rates),
            "first_call_seconds": [round(f, 3) for f in sorted(firsts)]}


def recommended_pilot(workers: int, pack: int) -> int:
    """A pilot that keeps every worker busy for two full calls, as the campaign will: a smaller one
    measures one worker alone, without the contention between workers (shared cores, memory bandwidth,
    the driver's folding), and its per-run time comes out optimistic."""
    return 2 * workers * pack


def wall_seconds(runs: int, runs_per_second: float, startup_seconds: float) -> float:
    return runs / runs_per_second + startup_seconds


def compute_hours(wall: float, workers: int, per_worker: float) -> float:
    """GPU-hours (per_worker = gpus_per_worker) or CPU core-hours (per_worker = cpus_per_worker)."""
    return wall / 3600.0 * workers * per_worker


DEGENERATE_CAVEAT = 0.5  # above this share of 0/1 accuracies the pilot's standard errors are not evidence


# --- the pilot ------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"longtail: {msg}", file=sys.stderr, flush=True)


def pilot_spec(spec: specs.Spec, pilot: int) -> specs.Spec:
    """The spec with `pilot` runs (rounded up to whole pairs for the paired design), a name of its own,
    and the estimates cut to what the pilot needs (no influence, no split halves, no early stop)."""
    c = spec.campaign
    k = len(c.ratios)
    step = 2 * k if c.design == "paired" else 1
    runs = max(pilot, 2, k) if step == 1 else max(step, -(-pilot // step) * step)
    name = (c.name[:58] + "-pilot")
    return spec.replace(campaign=dataclasses.replace(c, runs=runs, name=name),
                        estimates=dataclasses.replace(spec.estimates, influence="none", split_half=False,
                                                      target_se=0.0))


def measure_pilot(spec: specs.Spec, pilot: int, address: str | None, progress: bool = True,
                  spec_source: str = "") -> dict:
    """Run the pilot on the target cluster and return the plan (a JSON-safe dict)."""
    from workers.shard import read_meta

    from orchestrator.estimates_files import read_memorization

    from orchestrator.fold import fixed_sizes, influence_mode
    from orchestrator.campaign import create_or_open
    from cluster.connect import ray_init
    from orchestrator.driver import CampaignInterrupted, run_campaign
    from orchestrator.pool import WorkerPool

    pspec = pilot_spec(spec, pilot)
    tmp = Path(tempfile.mkdtemp(prefix="longtail-pilot-"))
    root = tmp / "campaign"
    started = time.monotonic()
    _say(f"pilot: {pspec.campaign.runs} runs of {spec.campaign.name!r} in {tmp} (removed afterwards)")
    try:
        campaign = create_or_open(pspec, root)
        t0 = time.monotonic()
        ray, owned, _ = ray_init(address, campaign.spec.resources.local_cpus)
        ray_seconds = time.monotonic() - t0
        try:
            cluster = ray.cluster_resources()
            workers = WorkerPool(ray, campaign, _say).fit()
            try:
                report = run_campaign(campaign, address=address, progress=progress)
            except CampaignInterrupted:  # its "longtail resume" hint would name the directory removed below
                raise CampaignInterrupted(f"interrupted; the pilot's temporary directory {tmp} is removed and there "
                                          f"is nothing to resume: plan again with `longtail plan "
                                          f"{spec_source or 'SPEC'}`") from None
            except CampaignError as e:  # e.g. the failure budget: its "longtail resume" hint does not apply here
                first = _first_failure(campaign.paths)
                raise PilotError("the pilot campaign failed: " + (
                    f"{len(campaign.failed_runs())} of {pspec.campaign.runs} runs failed; first failure: {first}. "
                    f"Fix the cause (`longtail validate {spec_source or 'SPEC'}` checks the spec), then plan again"
                    if first else str(e))) from None
        finally:
            if owned:
                ray.shutdown()
        paths = campaign.paths
        shards = sorted(paths.runs_dir.glob(paths.SHARD_GLOB))
        if report.trained == 0 or not shards:
            reasons = campaign.failure_reasons()
            first = _first_failure(paths)
            raise PilotError(f"no pilot run finished ({len(report.failed)} of {pspec.campaign.runs} failed); first "
                             f"failure: {first or next(iter(reasons), 'unknown')}. Fix the cause (check the spec with "
                             f"`longtail validate {spec_source or 'SPEC'}`), then plan again")
        metas = [read_meta(p) for p in shards]
        finished: dict = {}
        for meta in metas:
            finished.setdefault((meta.get("host"), meta.get("pid")), []).append(float(meta["finished_at"]))
        last = max(t for ts in finished.values() for t in ts)
        # the workers' clocks against the pilot's: its first dispatch was training_seconds before its last result
        timing = steady_timing(finished, last - report.training_seconds, runs_per_call(pspec), workers)
        mem = read_memorization(paths, ["acc_in", "acc_out"])
        acc_in = mem.column("acc_in").to_numpy(zero_copy_only=False).astype(np.float64)
        acc_out = mem.column("acc_out").to_numpy(zero_copy_only=False).astype(np.float64)
        measured = {
            "pilot_runs": pspec.campaign.runs, "trained": report.trained,
            "failed": len(report.failed), "first_failure": _first_failure(paths) if report.failed else None,
            "training_seconds": report.training_seconds,
            "startup_seconds": ray_seconds + report.seconds - report.training_seconds,
            "seconds": time.monotonic() - started,
            "workers_used": len({(m.get("host"), m.get("pid")) for m in metas}),
            "train_seconds_mean": float(np.mean([m.get("train_seconds", np.nan) for m in metas])),
            "test_acc_mean": float(np.mean([m["test_acc"] for m in metas])),
            "test_acc_sd": float(np.std([m["test_acc"] for m in metas])),
            "bytes_per_shard": float(np.mean([p.stat().st_size for p in shards])),
            "examples_bytes": paths.examples.stat().st_size,
            "memorization_bytes": paths.memorization.stat().st_size,
            "fold_bytes": paths.checkpoint.stat().st_size if paths.checkpoint.exists() else 0,
            **timing,
            # the campaign's own checkpoint, exactly: an empty fold of `spec` has the size of a full one
            "checkpoint_bytes": fixed_sizes(spec, campaign.dataset)["checkpoint"],
        }
        shape = SimpleNamespace(spec=spec, n_train=campaign.n_train, n_test=campaign.n_test)
        labels = campaign.labels
        cells = int(sum(int((labels["train_labels"] == k).sum()) * int((labels["test_labels"] == k).sum())
                        for k in np.unique(labels["train_labels"])))
        plan = build_plan(spec, measured, workers, cluster, influence_mode(shape), campaign.n_train, campaign.n_test,
                          cells, acc_in, acc_out)
        plan["pilot"]["directory"] = str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plan["pilot"]["directory_removed"] = not tmp.exists()
    plan["spec_file"] = spec_source
    plan["target"] = address or "embedded local Ray"
    return plan


def _first_failure(paths) -> str | None:
    """The reason of the first failure record, or None without one."""
    records = sorted(paths.failed_dir.glob(paths.FAILURE_GLOB)) if paths.failed_dir.exists() else []
    return first_reason(records[0]) if records else None


def build_plan(spec: specs.Spec, m: dict, workers: int, cluster: dict, mode: str, n_train: int, n_test: int,
               same_class_cells: int, acc_in: np.ndarray, acc_out: np.ndarray) -> dict:
    """Every number of the plan from the pilot's measurements (pure: no Ray, no files)."""
    c, res, e = spec.campaign, spec.resources, spec.estimates
    runs = c.runs
    k = len(c.ratios)
    ratio = spec.primary_ratio
    main = main_ratio_runs(runs, c.design, k, c.ratios.index(ratio))
    pack = runs_per_call(spec)  # as the driver packs
    steady = m.get("runs_per_second_per_worker")
    sec = 1.0 / steady if steady else seconds_per_run(m["training_seconds"], m["workers_used"], m["trained"])
    rate = workers / sec
    warmup = m.get("warmup_seconds", 0.0) if steady else 0.0
    training = runs / rate + warmup
    wall = wall_seconds(runs, rate, m["startup_seconds"]) + warmup
    gpu = res.gpus_per_worker > 0
    hours = compute_hours(wall, workers, res.gpus_per_worker if gpu else res.cpus_per_worker)
    storage = storage_bytes(mode, n_train, n_test, runs, len(e.soft), e.top_k, same_class_cells,
                            per_shard=m["bytes_per_shard"], examples=m["examples_bytes"],
                            memorization=m["memorization_bytes"], fold_per_example=m["fold_bytes"],
                            checkpoint=m.get("checkpoint_bytes"))
    share = in_share(c.design, ratio)
    ok = np.isfinite(acc_in) & np.isfinite(acc_out)  # examples the pilot saw both in and out
    v = variance_per_run(acc_in[ok], acc_out[ok], share)
    se = expected_se(v, main) if len(v) else np.array([np.nan])
    wanted = [DEFAULT_TARGET_SE] + ([e.target_se] if e.target_se and e.target_se != DEFAULT_TARGET_SE else [])
    needed = []
    for target in wanted:
        row = {"target_se": target,
               "runs_median": runs_for_se(float(np.median(v)), target) * k if len(v) else None,
               "runs_p90": runs_for_se(float(np.quantile(v, 0.9)), target) * k if len(v) else None,
               "runs_p99": runs_for_se(float(np.quantile(v, 0.99)), target) * k if len(v) else None,
               "runs_bound": runs_for_bound(target, ratio) * k}
        if target == e.target_se:
            row["target_share"] = e.target_share
            row["runs_target_share"] = (runs_for_se(float(np.quantile(v, e.target_share)), target) * k
                                        if len(v) else None)
        needed.append(row)
    return {
        "campaign": c.name, "runs": runs, "main_ratio_runs": main, "subset_ratio": ratio, "design": c.design,
        "n_train": n_train, "n_test": n_test, "influence_mode": mode,
        "pilot": {**{k2: v2 for k2, v2 in m.items()}},
        "cluster": {"cpus": cluster.get("CPU", 0), "gpus": cluster.get("GPU", 0), "workers": workers,
                    "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker},
        "pack": pack, "recommended_pilot": recommended_pilot(workers, pack),
        "seconds_per_run": sec, "runs_per_second": rate, "wall_seconds": wall,
        "training_seconds": training, "warmup_seconds": warmup, "startup_seconds": m["startup_seconds"],
        "gpu_hours" if gpu else "cpu_core_hours": hours,
        "storage_bytes": storage,
        "error_bound_rms": error_bound(main, ratio),
        "expected_se": {"formula": "sqrt(p_in(1-p_in)/(q t) + p_out(1-p_out)/((1-q) t))", "q": share, "t": main,
                        "examples": int(ok.sum()), "median": float(np.median(se)),
                        "p90": float(np.quantile(se, 0.9)), "p99": float(np.quantile(se, 0.99)),
                        "worst_case": float(expected_se(variance_per_run(0.5, 0.5, share), main)),
                        "degenerate_share": degenerate_share(acc_in[ok], acc_out[ok])},
        "runs_needed": needed,
    }


# --- printing -------------------------------------------------------------------------------------


def format_plan(p: dict) -> str:
    pl, cl, st = p["pilot"], p["cluster"], p["storage_bytes"]
    res = (f"{cl['gpus_per_worker']:g} GPU + " if cl["gpus_per_worker"] else "") + f"{cl['cpus_per_worker']:g} CPU"
    lines = [
        f"plan for campaign {p['campaign']!r}: {p['runs']} runs ({p['main_ratio_runs']} of subset ratio "
        f"{p['subset_ratio']:g}), {p['design']} design, {p['n_train']} train / {p['n_test']} test examples",
        f"pilot: {pl['trained']} of {pl['pilot_runs']} runs on {p['target']} ({cl['cpus']:g} CPUs, "
        f"{cl['gpus']:g} GPUs), "
        f"{pl['seconds']:.1f} s in all; it used {pl['workers_used']} worker(s); test accuracy "
        f"{pl['test_acc_mean']:.3f} ± {pl['test_acc_sd']:.3f} (mean ± sd over its runs)",
    ]
    if pl["workers_used"] < cl["workers"] or pl["trained"] < p["recommended_pilot"] // 2:
        lines.append(f"note: the pilot kept {pl['workers_used']} of {cl['workers']} workers busy ({p['pack']} runs per "
                     f"call); the campaign will run them all at once, and contention between them was not measured. "
                     f"For a closer estimate: --pilot {p['recommended_pilot']}")
    if pl["failed"]:
        lines.append(f"warning: {pl['failed']} pilot runs failed (first: {pl['first_failure']}); the campaign would "
                     f"record such runs in failed/")
    hours = (f"{p['gpu_hours']:.3g} GPU-hours" if "gpu_hours" in p else f"{p['cpu_core_hours']:.3g} CPU core-hours")
    se = p["expected_se"]
    rows = [
        ("seconds per run", f"{p['seconds_per_run']:.3g} s on one worker"
                            + (" once warm" if pl.get("runs_per_second_per_worker") else "")
                            + f" (training loop alone {pl['train_seconds_mean']:.3g} s)"),
        ("workers", f"{cl['workers']} ({res} each), as the cluster fits them"),
        ("throughput", f"{p['runs_per_second']:.3g} runs/s"),
        ("wall time", f"{format_seconds(p['wall_seconds'])} = {p['runs']} runs / {p['runs_per_second']:.3g} runs/s "
                      f"+ {p['warmup_seconds']:.1f} s warm-up + {p['startup_seconds']:.1f} s start-up"),
        ("compute", hours),
        ("storage", f"{format_bytes(st['total'])}: shards {format_bytes(st['shards'])} "
                    f"({format_bytes(pl['bytes_per_shard'])} x {p['runs']}), plan {format_bytes(st['plan'])}, "
                    f"estimates {format_bytes(st['estimates'])} ({p['influence_mode']} influence), "
                    f"checkpoint {format_bytes(st['checkpoint'])}"),
        ("error bound", f"{p['error_bound_rms']:.3f} RMS per estimate (paper, at {p['main_ratio_runs']} runs of "
                        f"ratio {p['subset_ratio']:g})"),
        ("memorization se", f"median {se['median']:.3f}, 90th percentile {se['p90']:.3f}, 99th {se['p99']:.3f} over "
                            f"{se['examples']} examples (expected, from the pilot's accuracies); "
                            f"{se['worst_case']:.3f} for an example at p = 0.5"),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [""] + [f"  {k:<{width}}  {v}" for k, v in rows]
    if se.get("degenerate_share", 0) > DEGENERATE_CAVEAT:
        lines.append(f"caveat: with {pl['trained']} pilot runs, {se['degenerate_share']:.0%} of the examples have in- "
                     f"and out-accuracies of exactly 0 or 1, whose estimated variance is 0: the standard errors and "
                     f"runs needed below are underestimates. For figures to rely on: --pilot "
                     f"{max(20, 2 * pl['trained'])}")
    lines += ["", "runs the campaign needs for a memorization standard error of",
              f"  {'target':>6}  {'median example':>14}  {'90% of examples':>15}  {'99% of examples':>15}  "
              f"{'paper bound':>11}"]
    for r in p["runs_needed"]:
        lines.append(f"  {r['target_se']:>6g}  {_count(r['runs_median']):>14}  {_count(r['runs_p90']):>15}  "
                     f"{_count(r['runs_p99']):>15}  {_count(r['runs_bound']):>11}")
        if "target_share" in r:
            lines.append(f"          [estimates] target_se = {r['target_se']:g} for {r['target_share']:.0%} of the "
                         f"examples (adaptive stopping): about {_count(r['runs_target_share'])} runs")
    return "\n".join(lines)


def _count(n) -> str:
    return "n/a" if n is None else f"{n:,}"
