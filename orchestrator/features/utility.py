"""`longtail utility`: the marginal utility of memorized examples (Feldman & Zhang 2020, Fig. 2 and the
CIFAR-100 table of Sec. 3.3), measured by retraining on the full training set minus chosen examples.

For every memorization threshold t, three conditions of `runs` models each, all trained with the
campaign's frozen recipe on the FULL training set (not on subsets) minus some examples:

    full            nothing removed (the baseline, shared by every comparison)
    memorized-<t>   every training example with mem >= t (estimates/memorization.parquet) removed
    random-<t>      as many examples as memorized-<t> removes, drawn uniformly (a fresh draw per model)

and, when the campaign found high-influence pairs (estimates/high_influence_pairs.parquet),

    pairs           the training examples of those pairs (S_h) removed: S \\ S_h

For each condition: mean test accuracy over its models with its standard error, the drop from
`full` with the standard error of a difference of independent means, and the share of the training
set removed; with pairs, the same on the influenced test examples (those in the pairs).

A follow-up model is named by (condition, rep): its training seed and, for random removal, its
removed set come from numpy's SeedSequence([campaign seed, "utility", condition, rep]), so a rerun
rebuilds it exactly. It is trained by the campaign's own RunWorker actors, which write its shard
atomically to DIR/utility/runs/<condition>-r<rep>.parquet; a model whose shard exists (and trained on
the set that is wanted now) is not trained again. Results: DIR/utility/utility.parquet (one row per
condition) and DIR/utility/summary.json. The campaign's own files are only read.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from estimators.precision import drop, mean_se  # the precision of a condition's mean, and of a drop
from workers.shard import ShardError, read_shard
from workers.results import WorkerResult
from workers.storage import atomic_write_bytes, atomic_write_text, is_temporary, makedirs

from orchestrator.campaign import Campaign, CampaignError
from orchestrator.dispatch import Dispatcher, Job, Work
from orchestrator.failures import quarantine, write_failure
from orchestrator.paths import CampaignPaths, UtilityPaths, stamp
from orchestrator.estimates_files import read_memorization_values, read_pairs, read_summary

FULL, MEMORIZED, RANDOM, PAIRS = "full", "memorized", "random", "pairs"


class UtilityError(CampaignError):
    """Bad input to `longtail utility`, or a state it cannot work from; says what and what to run next."""


# --- numeric parts (pure) -------------------------------------------------------------------------


def parse_thresholds(text: str) -> list[float]:
    """"0.25,0.5" -> [0.25, 0.5] (sorted, distinct). Each must lie in (0, 1]: memorization is at most 1,
    and a threshold <= 0 would call examples the models do not memorize at all "memorized"."""
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not all(parts):
        raise UtilityError(f"--thresholds {text!r}: expected comma-separated numbers such as 0.25,0.5; "
                           f"found an empty item")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise UtilityError(f"--thresholds {text!r}: expected comma-separated numbers such as 0.25,0.5; "
                               f"{p!r} is not a number") from None
        if not 0 < v <= 1:
            raise UtilityError(f"--thresholds {text!r}: each threshold must be in (0, 1] (memorization lies in "
                               f"[-1, 1]; the paper uses 0.25 and above); found {p}")
        values.append(v)
    return sorted(set(values))


def memorized(mem: np.ndarray, threshold: float) -> np.ndarray:
    """Ids of the training examples with mem >= threshold; undefined (NaN) estimates never qualify."""
    mem = np.asarray(mem, dtype=np.float64)
    return np.flatnonzero(np.isfinite(mem) & (mem >= threshold))


def _word(text: str) -> int:
    """A string as a 64-bit integer, for SeedSequence entropy (which takes integers only)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def utility_streams(campaign_seed: int, condition: str, rep: int) -> tuple[np.random.Generator, int]:
    """(removal generator, training seed) of follow-up model `rep` of `condition`: a pure function of
    (campaign seed, "utility", condition, rep), independent of the campaign's own streams
    SeedSequence([seed, run]), whose entropy has two words."""
    removal, train = np.random.SeedSequence([campaign_seed, _word("utility"), _word(condition), rep]).spawn(2)
    return np.random.default_rng(removal), int(train.generate_state(1)[0] & 0x7FFFFFFF)


def utility_run_id(condition: str, rep: int) -> int:
    """The run number stamped into (and checked in) a follow-up shard: stable across invocations,
    whatever other conditions are asked for."""
    return _word(f"utility/{condition}/r{rep}") & 0x7FFFFFFF


def random_removal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k of n ids, uniformly without replacement."""
    return np.sort(rng.choice(n, size=k, replace=False))


# --- what to train --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    name: str  # full, memorized-<t>, random-<t>, pairs
    kind: str  # FULL, MEMORIZED, RANDOM, PAIRS
    threshold: float | None
    removed: int  # how many training examples each of its models does not train on
    fixed: np.ndarray | None = None  # the removed ids, when the same for every model (memorized, pairs)


@dataclass(frozen=True)
class FollowUpRun:
    condition: str
    rep: int
    run_id: int
    seed: int
    mask: np.ndarray  # (n_train,) bool, True = trained on
    path: object  # where its shard goes

    @property
    def name(self) -> str:
        return f"{self.condition}-r{self.rep}"


def conditions(mem: np.ndarray, thresholds: list[float], pair_train: np.ndarray | None,
               say=lambda msg: None) -> list[Condition]:
    """The conditions to train, thresholds that remove nothing skipped (with a note through `say`); a
    threshold (or the pairs) that would remove every training example is an error."""
    n = len(mem)
    out = [Condition(FULL, FULL, None, 0)]
    for t in thresholds:
        ids = memorized(mem, t)
        if len(ids) == 0:
            finite = mem[np.isfinite(mem)]
            say(f"threshold {t:g} removes nothing: no training example has memorization >= {t:g} (the largest "
                f"estimate is {finite.max():.3f}); skipped" if len(finite) else
                f"threshold {t:g} removes nothing: every memorization estimate is undefined; skipped")
            continue
        if len(ids) >= n:
            raise UtilityError(f"--thresholds: {t:g} removes all {n} training examples (every estimate is >= {t:g}); "
                               f"nothing would be left to train on. Use a higher threshold.")
        out.append(Condition(f"{MEMORIZED}-{t:g}", MEMORIZED, t, len(ids), ids))
        out.append(Condition(f"{RANDOM}-{t:g}", RANDOM, t, len(ids)))
    if pair_train is not None:
        ids = np.unique(np.asarray(pair_train, np.int64))
        if len(ids) >= n:
            raise UtilityError(f"the high-influence pairs involve all {n} training examples; removing them leaves "
                               f"nothing to train on. Run without --pairs.")
        out.append(Condition(PAIRS, PAIRS, None, len(ids), ids))
    return out


def follow_up_runs(conds: list[Condition], runs: int, campaign_seed: int, n_train: int,
                   paths: UtilityPaths) -> list[FollowUpRun]:
    out = []
    for c in conds:
        for rep in range(runs):
            rng, seed = utility_streams(campaign_seed, c.name, rep)
            mask = np.ones(n_train, bool)
            if c.kind == RANDOM:
                mask[random_removal(rng, n_train, c.removed)] = False
            elif c.fixed is not None:
                mask[c.fixed] = False
            out.append(FollowUpRun(c.name, rep, utility_run_id(c.name, rep), seed, mask,
                                   paths.shard(c.name, rep)))
    return out


# --- results --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Test accuracy of one trained follow-up model, on all test examples and on the influenced ones."""

    acc: float
    acc_influenced: float
    rep: int = 0


def summarize(conds: list[Condition], outcomes: dict[str, list[Outcome]], n_train: int) -> list[dict]:
    """One row per condition: accuracy mean ± se over its models, drop from `full` ± se, on all test
    examples and on the influenced ones (NaN without pairs)."""
    base = sorted(outcomes.get(FULL, []), key=lambda o: o.rep)
    base_all = mean_se([o.acc for o in base])
    base_infl = mean_se([o.acc_influenced for o in base])
    rows = []
    for c in conds:
        got = sorted(outcomes.get(c.name, []), key=lambda o: o.rep)  # the same numbers whatever order runs finished in
        acc = mean_se([o.acc for o in got])
        infl = mean_se([o.acc_influenced for o in got])
        d, d_infl = drop(base_all, acc), drop(base_infl, infl)
        rows.append({
            "name": c.name, "kind": c.kind, "threshold": np.nan if c.threshold is None else c.threshold,
            "removed": c.removed, "removed_share": c.removed / n_train, "runs": len(got),
            "acc_mean": acc[0], "acc_se": acc[1],
            "drop": d[0] if c.kind != FULL else 0.0, "drop_se": d[1] if c.kind != FULL else np.nan,
            "acc_influenced_mean": infl[0], "acc_influenced_se": infl[1],
            "drop_influenced": d_infl[0] if c.kind != FULL else (0.0 if np.isfinite(infl[0]) else np.nan),
            "drop_influenced_se": d_infl[1] if c.kind != FULL else np.nan,
        })
    return rows


def influenced_share_of_drop(drop_influenced: float, n_influenced: int, n_test: int) -> float:
    """The part of the overall accuracy drop that the influenced test examples account for, in accuracy
    points of the whole test set: drop_influenced x n_influenced / n_test (the paper's 2.38 of 2.54 %)."""
    return drop_influenced * n_influenced / n_test


# --- the command ----------------------------------------------------------------------------------


@dataclass
class UtilityReport:
    rows: list[dict]
    info: dict
    trained: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    print(f"longtail: {msg}", file=sys.stderr, flush=True)


def _read_estimates(c: Campaign) -> tuple[np.ndarray, int]:
    found = read_memorization_values(c.paths, c.n_train)
    if found is None:
        raise UtilityError(f"no estimates yet: {c.paths.memorization} does not exist. Let the campaign fold some "
                           f"runs first (longtail resume {c.paths.root}), or recompute them from its shards "
                           f"(longtail estimate {c.paths.root})")
    return found


def _read_pairs(c: Campaign) -> tuple[np.ndarray, np.ndarray] | None:
    """(train ids, test ids) of the high-influence pairs, or None when the campaign has no pairs file."""
    t = read_pairs(c.paths, ["train", "test"])
    if t is None:
        return None
    return t.column("train").to_numpy().astype(np.int64), t.column("test").to_numpy().astype(np.int64)


def run_utility(campaign_dir, thresholds: list[float], runs: int = 5, pairs: bool | None = None,
                address: str | None = None, progress: bool = True) -> UtilityReport:
    """Train what is missing of the follow-up experiment on DIR and write DIR/utility/. Resumable."""
    from orchestrator.campaign import create_or_open
    from orchestrator.lock import DriverLock, LockedError

    start = time.monotonic()
    c = create_or_open(None, campaign_dir, load_data=False)
    mem, est_runs = _read_estimates(c)
    if est_runs == 0 or not np.isfinite(mem).any():
        raise UtilityError(f"the estimates in {c.paths.memorization} stand on {est_runs} runs and define no "
                           f"memorization value yet; let the campaign fold more runs (longtail resume "
                           f"{c.paths.root}) and try again")
    found = _read_pairs(c)
    have_pairs = found is not None and len(found[0]) > 0
    if pairs is None:
        pairs = have_pairs
    elif pairs and not have_pairs:
        why = (f"{c.paths.pairs} does not exist (the campaign's [estimates] influence is "
               f"{c.spec.estimates.influence!r})" if found is None else f"{c.paths.pairs} holds no pair")
        raise UtilityError(f"--pairs: no high-influence pairs to remove: {why}. Run without --pairs.")
    campaign_summary = read_summary(c.paths) or {}
    if not campaign_summary.get("complete", False):
        _say(f"the campaign is not complete: its estimates stand on {est_runs} of {c.plan.runs} runs; the examples "
             f"selected now may change as it goes on (a later `longtail utility` retrains only the models whose "
             f"removed set changed)")

    conds = conditions(mem, thresholds, found[0] if pairs else None, _say)
    if len(conds) == 1:
        raise UtilityError(f"no threshold in {','.join(f'{t:g}' for t in thresholds)} removes any training example "
                           f"(the largest memorization estimate is {np.nanmax(mem):.3f})"
                           + (" and there are no high-influence pairs" if not have_pairs else "")
                           + "; nothing to compare with the full training set. Use lower thresholds.")
    root = c.paths.utility_dir
    runs_dir = c.paths.utility.runs_dir
    makedirs(runs_dir)
    influenced = np.unique(found[1]) if pairs else np.zeros(0, np.int64)
    todo_runs = follow_up_runs(conds, runs, c.plan.campaign_seed, c.n_train, c.paths.utility)

    lock = DriverLock(c.paths.utility.lock)
    try:
        lock.acquire()
    except LockedError as e:  # two of them would train the same models twice
        raise UtilityError(f"another `longtail utility` is working on {root}: {e}") from None
    try:
        if lock.note:
            _say(lock.note)
        for entry in runs_dir.iterdir():  # a crash of the worker writing a shard leaves at most a temporary file
            if is_temporary(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
        report = UtilityReport(rows=[], info={})
        outcomes: dict[str, list[Outcome]] = {}
        todo = []
        for r in todo_runs:
            got = _existing(c, r, root, influenced)
            if got is None:
                todo.append(r)
            else:
                outcomes.setdefault(r.condition, []).append(got)
                report.reused += 1
        if todo:
            _train(c, todo, len(todo_runs), address, progress, influenced, outcomes, report, lock)
        report.rows = summarize(conds, outcomes, c.n_train)
        report.info = {
            "campaign": c.name, "directory": str(c.paths.root), "n_train": c.n_train, "n_test": c.n_test,
            "estimates_runs": est_runs, "campaign_runs_planned": c.plan.runs,
            "campaign_complete": bool(campaign_summary.get("complete", False)),
            "runs_per_condition": runs, "thresholds": thresholds,
            "skipped_thresholds": [t for t in thresholds if not any(x.threshold == t for x in conds)],
            "seeds": "SeedSequence([campaign seed, sha256('utility'), sha256(condition), rep]).spawn(2): "
                     "removal draw, training seed",
            "trained_now": report.trained, "reused": report.reused, "failed_now": report.failed,
            "seconds": round(time.monotonic() - start, 2), "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if pairs:
            base = next(r for r in report.rows if r["kind"] == FULL)
            p = next(r for r in report.rows if r["kind"] == PAIRS)
            report.info["pairs"] = {
                "pairs": int(len(found[0])), "train_examples_removed": p["removed"],
                "influenced_test_examples": int(len(influenced)),
                "mem_threshold": c.spec.estimates.mem_threshold, "infl_threshold": c.spec.estimates.infl_threshold,
                "influenced_share_of_drop": influenced_share_of_drop(p["drop_influenced"], len(influenced), c.n_test),
                "full_acc": base["acc_mean"], "full_acc_influenced": base["acc_influenced_mean"],
            }
        _write_results(c.paths, report)
    finally:
        lock.release()
    return report


def _existing(c: Campaign, r: FollowUpRun, root, influenced: np.ndarray) -> Outcome | None:
    """The outcome of a follow-up model whose shard is already there, or None when it must be trained.

    A shard that cannot be trusted, or that trained on another set than the one wanted now (the
    campaign's estimates moved since), is moved aside to utility/stale/ with the reason: never deleted."""
    if not r.path.exists():
        return None
    try:
        return _outcome(c, r, influenced)
    except ShardError as e:
        target = quarantine(r.path, c.paths.utility.stale(r.path, stamp()), str(e))
        _say(f"{r.path} is not usable ({e}); moved to {target}, the model will be trained again")
        return None


def _outcome(c: Campaign, r: FollowUpRun, influenced: np.ndarray) -> Outcome:
    data = read_shard(r.path, campaign=c.name, spec_hash=c.spec.result_hash(), run=r.run_id,
                      n_train=c.n_train, n_test=c.n_test, mask=None)
    if not np.array_equal(data.mask, r.mask):
        diff = int((data.mask != r.mask).sum())
        raise ShardError(f"{r.path}: trained on a set that differs from the one {r.condition} removes now in "
                         f"{diff} examples (the campaign's estimates changed since it was trained)")
    correct = data.test_correct
    return Outcome(float(correct.mean()), float(correct[influenced].mean()) if len(influenced) else float("nan"), r.rep)


def _train(c: Campaign, todo: list[FollowUpRun], total: int, address: str | None, show_progress: bool,
           influenced: np.ndarray, outcomes: dict[str, list[Outcome]], report: UtilityReport, lock,
           executor=None) -> None:
    """The follow-up runs through the campaign's Dispatcher (orchestrator/dispatch.py), on the campaign's
    own RunWorker actors (or `executor`'s workers): a bounded number of calls in flight, runs whose
    worker died retried alone elsewhere ([resources] max_retries), the lock heartbeated, runs that fail
    on their own recorded in utility/failed/ and retried by the next invocation."""
    if executor is None:
        from orchestrator.pool import ray_workers

        with ray_workers(c, address, c.paths.utility_dir, _say) as (pool, _):
            return _train(c, todo, total, address, show_progress, influenced, outcomes, report, lock, pool)
    from orchestrator.pool import runs_per_call
    from orchestrator.progress import Progress

    res = c.spec.resources
    work = FollowUps(c, influenced, outcomes, report, done=total - len(todo))
    dispatcher = Dispatcher(executor, work, pack=runs_per_call(c.spec), max_in_flight=res.max_in_flight,
                            max_retries=res.max_retries, max_failures=res.max_failures, planned=total, say=_say,
                            lock=lock, failed=report.failed)
    workers = dispatcher.start([Job(r.name, (r.run_id, np.packbits(r.mask), r.seed, str(r.path)),
                                    f"follow-up run {r.name}", r) for r in todo])
    _say(f"utility of {c.name!r}: {len(todo)} follow-up runs to train on {workers} workers "
         f"({total - len(todo)} of {total} already done)")
    dispatcher.run(Progress(total=total, done=total - len(todo), enabled=show_progress))


class FollowUps(Work):
    """What `longtail utility` does with its runs in the Dispatcher: read each model's test outcomes."""

    error = UtilityError
    noun = "follow-up run"
    no_worker = "no worker is left to train the follow-up runs; see the messages above"

    def __init__(self, c: Campaign, influenced: np.ndarray, outcomes: dict[str, list[Outcome]],
                 report: UtilityReport, done: int):
        self.c, self.influenced, self.outcomes, self.report, self.done = c, influenced, outcomes, report, done
        self.paths = c.paths.utility
        self.failed_dir = self.paths.failed_dir
        self.resume = "run the same `longtail utility` again: finished runs are kept"

    def task_name(self, jobs: list[Job]) -> str:
        return f"longtail:{self.c.name}:utility"  # the dashboard and `ray summary tasks` tell follow-ups apart

    def failure_path(self, name: str):
        return self.paths.failure(name)

    def record(self, job: Job, reason: str, detail: str, host: str, attempts: int | None) -> None:
        r: FollowUpRun = job.item
        write_failure(self.paths.failure(r.name), {"run": r.name, "condition": r.condition, "rep": r.rep},
                      reason, detail, host)

    def finished(self) -> int:
        return self.done

    def accept(self, job: Job, result: WorkerResult) -> str | None:
        r: FollowUpRun = job.item
        if result.shard is not None:  # a worker that cannot see the campaign directory sent the shard's bytes
            atomic_write_bytes(r.path, result.shard)
        try:
            got = _outcome(self.c, r, self.influenced)
        except ShardError as e:
            return f"its shard failed verification: {e}"
        if self.paths.failed_dir.exists():  # failed in an earlier invocation, done now
            self.paths.failure(r.name).unlink(missing_ok=True)
        self.outcomes.setdefault(r.condition, []).append(got)
        self.report.trained += 1
        self.done += 1
        return None


COLUMNS = ("name", "kind", "threshold", "removed", "removed_share", "runs", "acc_mean", "acc_se", "drop", "drop_se",
           "acc_influenced_mean", "acc_influenced_se", "drop_influenced", "drop_influenced_se")


def _write_results(paths, report: UtilityReport) -> None:
    from orchestrator.estimates_files import json_safe, write_parquet

    cols = {k: [row[k] for row in report.rows] for k in COLUMNS}
    table = pa.table({k: pa.array(v, pa.string() if k in ("name", "kind") else
                                  pa.int64() if k in ("removed", "runs") else pa.float64())
                      for k, v in cols.items()})
    write_parquet(paths.utility_results, table, sum(row["runs"] for row in report.rows))
    out = json_safe({**report.info, "conditions": report.rows})
    atomic_write_text(paths.utility.summary, json.dumps(out, indent=2) + "\n")


# --- printing -------------------------------------------------------------------------------------


def _pct(mean: float, se: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    mean = round(100 * mean, 2) / 100 + 0.0  # no "-0.00" for a difference that rounds to zero
    return f"{100 * mean:6.2f} ± {100 * se:4.2f}" if np.isfinite(se) else f"{100 * mean:6.2f}       "


def format_report(report: UtilityReport) -> str:
    info, rows = report.info, report.rows
    lines = [f"marginal utility of memorized examples, campaign {info['campaign']!r}: memorization from "
             f"{info['estimates_runs']} runs; every model trains on the full training set ({info['n_train']} "
             f"examples) minus the removed ones; {info['runs_per_condition']} models per condition",
             f"test accuracy in % over {info['n_test']} test examples (mean ± standard error over the models); "
             f"drop = full minus the condition, ± the standard error of a difference of independent means",
             "",
             f"{'condition':<16} {'removed':>8} {'share':>7} {'models':>6}  {'test accuracy %':>15}  {'drop %':>13}"]
    for r in rows:
        drop_text = "" if r["kind"] == FULL else _pct(r["drop"], r["drop_se"])
        lines.append(f"{r['name']:<16} {r['removed']:>8} {100 * r['removed_share']:>6.1f}% {r['runs']:>6}  "
                     f"{_pct(r['acc_mean'], r['acc_se']):>15}  {drop_text:>13}")
    p = info.get("pairs")
    if p:
        base = next(r for r in rows if r["kind"] == FULL)
        rem = next(r for r in rows if r["kind"] == PAIRS)
        lines += ["",
                  f"high-influence pairs (mem >= {p['mem_threshold']:g}, infl >= {p['infl_threshold']:g}): "
                  f"{p['pairs']} pairs; S_h = their {p['train_examples_removed']} training examples; "
                  f"{p['influenced_test_examples']} influenced test examples",
                  f"{'training set':<14} {'all test examples %':>20}  {'influenced test examples %':>27}",
                  f"{'full S':<14} {_pct(base['acc_mean'], base['acc_se']):>20}  "
                  f"{_pct(base['acc_influenced_mean'], base['acc_influenced_se']):>27}",
                  f"{'S minus S_h':<14} {_pct(rem['acc_mean'], rem['acc_se']):>20}  "
                  f"{_pct(rem['acc_influenced_mean'], rem['acc_influenced_se']):>27}",
                  f"{'difference':<14} {_pct(rem['drop'], rem['drop_se']):>20}  "
                  f"{_pct(rem['drop_influenced'], rem['drop_influenced_se']):>27}",
                  f"the influenced test examples account for {100 * p['influenced_share_of_drop']:.2f} of the "
                  f"{100 * rem['drop']:.2f} points of the overall drop"]
    u = CampaignPaths(info["directory"]).utility
    lines += ["", f"trained {info['trained_now']} follow-up runs now, {info['reused']} were already done"
              + (f"; {len(info['failed_now'])} failed (see {u.failed_dir}/; run again to retry)"
                 if info["failed_now"] else "")
              + f"; {info['seconds']:.1f} s",
              f"results in {u.root}/ ({u.results.name}, {u.summary.name})"]
    return "\n".join(lines)
