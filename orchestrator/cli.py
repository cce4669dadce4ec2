"""The `longtail` command: a thin shell over the orchestrator. Each command calls one function."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from importlib import resources
from pathlib import Path

import click

from . import spec as specs
from .progress import format_bytes

DEMO_SPEC = "demo.toml"


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _errors():
    """The exceptions that mean bad input or a refused action, printed without a traceback."""
    from workers.options import SetupError
    from workers.storage import StorageError

    from .campaign import CampaignError
    from .lock import LockedError
    from .plan import PlanError

    return (specs.SpecError, SetupError, PlanError, CampaignError, LockedError, StorageError)


def _load_spec(path: str) -> specs.Spec:
    try:
        return specs.load(path)
    except specs.SpecError as e:
        _fail(str(e))


def _default_out(spec: specs.Spec) -> str:
    return str(Path("campaigns") / spec.campaign.name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="longtail")
def main():
    """Memorization and influence estimation campaigns (Feldman & Zhang 2020) on Ray.

    A campaign trains many models, each on a random subset of the training set, records every
    model's prediction on every example, and compares the runs that saw an example with those
    that did not. See docs/ for the spec, the campaign directory and the estimators.
    """


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
def validate(spec_file):
    """Check SPEC_FILE, print the resolved spec and the size of the work; start nothing."""
    from workers.datasets import load_dataset
    from workers.worker import preflight

    from .plan import subset_size, validate_design

    spec = _load_spec(spec_file)
    try:
        data = load_dataset(spec.dataset.as_dict())
        validate_design(spec.campaign.design, spec.campaign.ratios, data.n_train, spec.campaign.runs,
                        f"[campaign] in {spec_file}")
        preflight(spec.to_dict(), data)
    except _errors() as e:
        _fail(str(e))
    click.echo(specs.dumps(spec))
    t = spec.campaign.runs
    rows = t * (data.n_train + data.n_test)
    shard_bytes = rows * 2.9  # measured 2.6-2.9 bytes per row (docs/performance.md)
    infl = data.n_train * data.n_test * 4 if spec.estimates.influence in ("dense", "auto") else 0
    click.echo(f"# dataset {spec.dataset.name!r}: {data.n_train} train, {data.n_test} test examples, "
               f"{data.num_classes} classes, inputs {data.input_shape}")
    sizes = ", ".join(f"{subset_size(r, data.n_train)}" for r in spec.campaign.ratios)
    click.echo(f"# work: {t} runs x {data.n_train + data.n_test} examples = {rows:,} predictions; "
               f"each run trains on {'about ' if spec.campaign.design != 'fixed' else ''}{sizes} examples "
               f"({spec.campaign.design} design)")
    click.echo(f"# disk: about {format_bytes(shard_bytes)} of shards, {format_bytes(t * ((data.n_train + 7) // 8 + 8))} of plan"
               + (f", {format_bytes(2 * infl)} for dense influence (estimate + checkpoint)" if infl else ""))
    from estimators.estimates import error_bound

    main_runs = len(range(spec.campaign.ratios.index(spec.primary_ratio), t, len(spec.campaign.ratios)))
    click.echo(f"# error bound (paper, RMS per estimate) at {main_runs} runs of ratio {spec.primary_ratio}: "
               f"{error_bound(main_runs, spec.primary_ratio):.3f}")


@main.command("spec-reference")
def spec_reference():
    """Print every spec key with its default, accepted values and meaning (Markdown)."""
    click.echo(specs.reference_markdown())


def _run(spec: specs.Spec | None, out: str, address: str | None, progress: bool, top: int,
         dashboard_host: str = "127.0.0.1") -> None:
    from .campaign import create_or_open
    from .driver import CampaignInterrupted, run_campaign

    _stop_on_sigterm()
    try:
        campaign = create_or_open(spec, out)
        for note in campaign.notes:
            click.echo(f"longtail: {note}", err=True)
        report = run_campaign(campaign, address=address, progress=progress, dashboard_host=dashboard_host)
    except CampaignInterrupted as e:
        _fail(str(e), 130)
    except _errors() as e:
        _fail(str(e))
    _print_result(campaign.paths, report.summary, top, report)


def _stop_on_sigterm() -> None:
    """`ray job stop` and `kill` send SIGTERM: save the fold and exit as on Ctrl-C, not abruptly."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _print_result(paths, summary: dict, top: int, report=None) -> None:
    runs = summary["runs"]
    if report is not None:
        rate = report.trained / report.training_seconds if report.trained and report.training_seconds else 0
        click.echo(f"trained {report.trained} runs in {report.training_seconds:.1f} s"
                   + (f" ({rate:.1f} runs/s)" if rate else "")
                   + f", {report.seconds:.1f} s in all with start-up and estimates; "
                   f"{report.already_done} were already done")
        if report.failed:
            click.echo(f"{len(report.failed)} runs failed (see {paths.failed_dir}); "
                       f"`longtail resume {paths.root}` retries them")
    acc = summary.get("test_accuracy") or {}
    click.echo(f"{runs['folded']}/{runs['planned']} runs folded"
               + (f"; test accuracy {acc['mean']:.3f} ± {acc['std']:.3f} (mean ± sd over runs)" if acc else ""))
    click.echo(f"estimates in {paths.estimates_dir}/ (memorization.parquet, "
               f"{'influence.npy, high_influence_pairs.parquet, ' if paths.influence.exists() else ''}summary.json)")
    if top:
        show_top(paths, top)


def _print_figures(summary: dict) -> None:
    """The paper's figures from summary.json, when the campaign has them."""
    mem = summary.get("memorization") or {}
    if mem.get("share_at_least"):
        shares = ", ".join(f">= {t}: {v:.1%}" for t, v in mem["share_at_least"].items() if v is not None)
        click.echo(f"  memorization: mean {mem['mean']:.3f}; share of training examples {shares}")
    pairs = summary.get("high_influence_pairs")
    if pairs:
        click.echo(f"  high-influence pairs (mem >= {pairs['mem_threshold']}, infl >= {pairs['infl_threshold']}): "
                   f"{pairs['pairs']} pairs, {pairs['test_examples']} test examples, "
                   f"{pairs['test_examples_with_one_influencer']} with a single influencer")
    half = summary.get("split_half")
    if half:
        corr = half.get("memorization_correlation")
        click.echo(f"  split halves ({half['runs'][0]} + {half['runs'][1]} runs): memorization correlation "
                   f"{corr if corr is None else f'{corr:.3f}'}, memorized-set Jaccard (>= 0.25) "
                   f"{half.get('memorized_jaccard_0.25', float('nan')):.2f}"
                   + (f", pairs Jaccard {half['pairs_jaccard']:.2f}" if "pairs_jaccard" in half else ""))
    bound = summary.get("error_bound_rms")
    if bound is not None:
        main_runs = next((g["runs"] for g in summary.get("ratios", []) if g["subset_ratio"] == summary["subset_ratio"]),
                         summary["runs"]["folded"])
        click.echo(f"  error bound (paper, RMS per estimate) at {main_runs} runs of ratio {summary['subset_ratio']}: "
                   f"{bound:.3f}")


def show_top(paths, k: int) -> None:
    import pyarrow.parquet as pq

    from workers.storage import arrow_source

    source, filesystem = arrow_source(paths.memorization)
    t = pq.read_table(source, filesystem=filesystem).to_pandas()
    t = t[t["mem"].notna()].sort_values(["mem", "example"], ascending=[False, True]).head(k)
    click.echo(f"\nthe {k} most memorized training examples (estimate ± standard error):")
    click.echo(f"{'example':>8} {'label':>5}  {'memorization':>15}  {'in-acc':>6} {'out-acc':>7} {'runs in/out':>12}")
    for row in t.itertuples():
        click.echo(f"{row.example:>8} {row.label:>5}  {row.mem:>7.3f} ± {row.se:.3f}  {row.acc_in:>6.3f} "
                   f"{row.acc_out:>7.3f} {f'{row.n_in}/{row.n_out}':>12}")


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--out", default=None,
              help="campaign directory, a local path or a pyarrow.fs URI such as s3://bucket/prefix (default: "
                   "campaigns/<name>); an existing campaign there is continued")
@click.option("--address", default=None, envvar="LONGTAIL_RAY_ADDRESS",
              help="join the Ray cluster at ADDR (e.g. 10.0.0.10:6379) instead of starting a local one")
@click.option("--progress/--no-progress", default=True, help="show the progress display")
@click.option("--top", default=10, show_default=True, help="print the TOP most memorized examples at the end")
@click.option("--dashboard-host", default="127.0.0.1", show_default=True,
              help="interface the embedded cluster's dashboard listens on; anything but loopback exposes it "
                   "to the network, protected only by Ray's token")
def run(spec_file, out, address, progress, top, dashboard_host):
    """Run the campaign SPEC_FILE describes; continue it if it already exists.

    Starts an embedded local Ray (dashboard on 127.0.0.1) unless --address is given (or the
    RAY_ADDRESS of a Ray job is set). Finished runs are never trained again; estimates/ is updated
    while the campaign runs.
    """
    spec = _load_spec(spec_file)
    _run(spec, out or _default_out(spec), address, progress, top, dashboard_host)


@main.command()
@click.argument("campaign_dir")
@click.option("--address", default=None, envvar="LONGTAIL_RAY_ADDRESS", help="join the Ray cluster at ADDR")
@click.option("--progress/--no-progress", default=True)
@click.option("--top", default=10, show_default=True)
def resume(campaign_dir, address, progress, top):
    """Continue the campaign in CAMPAIGN_DIR (a path or URI) with its frozen spec."""
    _run(None, campaign_dir, address, progress, top)


@main.command()
@click.argument("target")
@click.option("--address", default=None, envvar="RAY_API_SERVER_ADDRESS",
              help="the cluster's job API (http://HEAD:8265) when TARGET is a submission id")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
def status(target, address, as_json):
    """How far a campaign is. TARGET is a campaign directory (runs done, folded, failed, its driver,
    the paper's figures) or, with --address, the submission id of a campaign submitted as a Ray job."""
    if "://" not in target and not Path(target).is_dir() and address:
        _job_status(target, address, as_json)
        return
    from .campaign import create_or_open
    from .lock import DriverLock

    campaign_dir = target
    try:
        c = create_or_open(None, campaign_dir, load_data=False)
    except _errors() as e:
        _fail(str(e))
    finished = c.finished_runs()
    failed = c.failed_runs() - finished
    summary = json.loads(c.paths.summary.read_text()) if c.paths.summary.exists() else {}
    holder = DriverLock(c.paths.lock).holder() if c.paths.lock.exists() else None
    info = {"campaign": c.name, "directory": str(c.paths.root), "runs_planned": c.plan.runs,
            "runs_finished": len(finished), "runs_failed": len(failed), "failure_reasons": c.failure_reasons(),
            "runs_folded": summary.get("runs", {}).get("folded", 0), "complete": summary.get("complete", False),
            "target_se": summary.get("target_se"), "stopped_early": summary.get("stopped_early"), "driver": holder}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"campaign {c.name!r} in {c.paths.root}")
    click.echo(f"  runs: {len(finished)}/{c.plan.runs} finished, {info['runs_folded']} folded into estimates, "
               f"{len(failed)} failed")
    click.echo("  driver: " + (f"pid {holder['pid']} on {holder['host']} since {holder['started']}" if holder
                               else "none running"))
    target = summary.get("target_se")
    if target and target.get("share") is not None:
        click.echo(f"  adaptive stopping: {target['share']:.1%} of the memorization estimates have a standard error "
                   f"<= {target['target']} (stops at {target['wanted_share']:.0%})")
    if summary.get("stopped_early"):
        click.echo(f"  stopped early: {summary['stopped_early']}")
    if failed:
        reasons = "; ".join(f"{n} x {why}" for why, n in c.failure_reasons().items())
        click.echo(f"  failures: {reasons} (details in {c.paths.failed_dir}/; `longtail resume {c.paths.root}` "
                   f"retries them)")
    _print_figures(summary)
    if len(finished) < c.plan.runs and not holder:
        click.echo(f"  continue with: longtail resume {c.paths.root}")


def _job_status(submission_id: str, address: str, as_json: bool) -> None:
    from . import jobs

    try:
        info = jobs.info(address, submission_id)
        progress = jobs.last_progress(jobs.logs(address, submission_id))
    except jobs.JobError as e:
        _fail(str(e))
    status = str(info.status.value) if hasattr(info.status, "value") else str(info.status)
    meta = info.metadata or {}
    out = {"submission_id": submission_id, "status": status, "message": info.message,
           "campaign": meta.get("longtail_campaign"), "directory": meta.get("longtail_out"),
           "start_time": info.start_time, "end_time": info.end_time, "last_progress": progress}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"job {submission_id}: {status}" + (f" ({info.message})" if info.message else ""))
        click.echo(f"  campaign {out['campaign']!r} in {out['directory']} on the cluster")
        if progress:
            click.echo(f"  {progress}")
    if status == "FAILED":
        sys.exit(1)


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS",
              help="the cluster's job API, e.g. http://127.0.0.1:8265 through an SSH tunnel to the head")
@click.option("--out", default=None,
              help="campaign directory on the cluster (default: ~/longtail-campaigns/<name> on the head); "
                   "an existing campaign there is continued")
@click.option("--module", "modules", multiple=True, type=click.Path(exists=True),
              help="another local module or package to ship with the job (plug-ins named in the spec are "
                   "found and shipped automatically)")
def submit(spec_file, address, out, modules):
    """Submit the campaign SPEC_FILE describes to a Ray cluster as a job, and return.

    The job runs `longtail run` on the head node; its progress lines appear in the dashboard's Jobs
    view and in `longtail logs`. Submitting again after a stop resumes the same campaign."""
    from . import jobs

    spec = _load_spec(spec_file)
    out = out or f"~/longtail-campaigns/{spec.campaign.name}"
    try:
        submission_id = jobs.submit(spec, address, out, list(modules))
    except jobs.JobError as e:
        _fail(str(e))
    click.echo(f"submitted campaign {spec.campaign.name!r} as job {submission_id}")
    click.echo(f"campaign directory on the cluster: {out}")
    click.echo("next:")
    for cmd in (f"longtail status {submission_id} --address {address}",
                f"longtail logs {submission_id} --address {address} --follow",
                f"longtail stop {submission_id} --address {address}"):
        click.echo(f"  {cmd}")


@main.command()
@click.argument("submission_id")
@click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS", help="the cluster's job API")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
def logs(submission_id, address, follow):
    """Print the driver log of a submitted campaign."""
    from . import jobs

    try:
        if follow:
            for chunk in jobs.follow(address, submission_id):
                click.echo(chunk, nl=False)
        else:
            click.echo(jobs.logs(address, submission_id), nl=False)
    except jobs.JobError as e:
        _fail(str(e))


@main.command()
@click.argument("submission_id")
@click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS", help="the cluster's job API")
def stop(submission_id, address):
    """Stop a submitted campaign. Finished runs are kept; submit the spec again to resume it."""
    from . import jobs

    try:
        final = jobs.stop(address, submission_id)
    except jobs.JobError as e:
        _fail(str(e))
    click.echo(f"job {submission_id}: {final}")
    if final not in jobs.TERMINAL:
        _fail(f"the job did not stop within 60 s; check `longtail status {submission_id} --address {address}`", 1)


@main.command()
@click.argument("campaign_dir")
@click.option("--top", default=10, show_default=True)
def estimate(campaign_dir, top):
    """Recompute estimates/ of CAMPAIGN_DIR from its shards alone (no Ray, no dataset, no checkpoint)."""
    from .aggregate import Aggregator
    from .campaign import create_or_open
    from .driver import RunReport, fold_existing
    from .outputs import write_estimates

    try:
        c = create_or_open(None, campaign_dir, load_data=False)
        agg = Aggregator(c, from_scratch=True)
        report = RunReport(planned=c.plan.runs, already_done=0)
        fold_existing(c, agg, report)
        summary = write_estimates(agg, complete=bool(agg.folded.all()))
    except _errors() as e:
        _fail(str(e))
    _print_result(c.paths, summary, top)


@main.command()
@click.argument("campaign_dir")
@click.option("--format", "fmt", type=click.Choice(["fz", "parquet"]), required=True,
              help="fz: the paper's released .npz layouts; parquet: tables keyed by example id")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="output directory (default: CAMPAIGN_DIR/export)")
def export(campaign_dir, fmt, dest):
    """Export the estimates of CAMPAIGN_DIR (from its fold checkpoint) for other tools."""
    from .aggregate import Aggregator
    from .campaign import create_or_open
    from .outputs import export_fz, export_parquet

    try:
        c = create_or_open(None, campaign_dir, load_data=False)
        agg = Aggregator(c)
        if agg.stats.runs == 0:
            _fail(f"{c.paths.root} has no folded runs yet; run or resume the campaign first")
        if dest is None and "://" in campaign_dir:
            _fail("exports are written to a local directory: give --dest for a campaign on an object store")
        files = (export_fz if fmt == "fz" else export_parquet)(agg, Path(dest) if dest else c.paths.root / "export")
    except _errors() as e:
        _fail(str(e))
    click.echo(f"exported {agg.stats.runs} runs of {c.name!r}:")
    for f in files:
        click.echo(f"  {f}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="longtail-demo", show_default=True,
              help="campaign directory")
@click.option("--runs", type=int, default=None, help="override the number of runs (default: the demo spec's)")
@click.option("--progress/--no-progress", default=True)
def demo(out, runs, progress):
    """The paper's setting on scikit-learn's digits: 0.7 subsets, 1,000+ MLPs, on an embedded Ray."""
    text = resources.files("orchestrator").joinpath(DEMO_SPEC).read_text()
    spec = specs.loads(text, f"orchestrator/{DEMO_SPEC}")
    if runs is not None:
        spec = spec.replace(campaign=dataclasses.replace(spec.campaign, runs=runs))
    click.echo(f"longtail demo: {spec.campaign.runs} runs of an MLP on digits, each on a random "
               f"{spec.campaign.subset_ratio:.0%} subset, campaign directory {out}/", err=True)
    _run(spec, out, None, progress, 10)


# commands defined beside what they compute
from .followup import utility_command  # noqa: E402
from .pilot import plan_command  # noqa: E402
from .report import report_command  # noqa: E402
from .tune import tune_command  # noqa: E402

for command in (report_command, utility_command, plan_command, tune_command):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
