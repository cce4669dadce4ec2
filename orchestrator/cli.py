"""The `longtail` command: a thin shell over the orchestrator. Each command calls one function."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import click

from workers.errors import LongtailError

from orchestrator import spec as specs
from orchestrator.paths import AuditPaths, CampaignPaths
from orchestrator.progress import format_bytes, format_seconds

DEMO_SPEC = "demo.toml"
EXIT_INCOMPLETE = 3  # run/resume/demo ended without error but with runs missing (failed within the budget)


def _fail(msg: str, code: int = 2):
    """Refuse with one line: raised, so that the one handler in `Commands.invoke` prints it."""
    error = LongtailError(msg)
    error.exit_code = code
    raise error


def _errors() -> tuple[type[Exception], ...]:
    """What means bad input or a refused action (kept for modules that catch it themselves)."""
    return (LongtailError,)


def report_error(e: LongtailError) -> None:
    """The one way a user-facing error reaches the terminal: "error: <message>" on stderr, and for a
    plug-in's fault the plug-in's own traceback under its own header (docs/decisions.md)."""
    click.echo(f"error: {e}", err=True)
    tb = getattr(e, "plugin_traceback", "")
    if tb:
        click.echo("plug-in traceback (for the plug-in's author; longtail itself did not fail):", err=True)
        click.echo(tb.rstrip("\n"), err=True)


class Commands(click.Group):
    """Every command runs under this group: a LongtailError anywhere below becomes its one line and its
    exit code (2; 130 for an interrupted campaign); Ctrl-C elsewhere exits 130 without a traceback.
    Anything else is a bug in longtail and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LongtailError as e:
            report_error(e)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted (Ctrl-C)", err=True)
            sys.exit(130)


def _load_spec(path: str) -> specs.Spec:
    return specs.load(path)


def _in_campaign(name: str) -> str:
    """A campaign file's path inside any campaign directory, for messages: "state/fold.npz"."""
    paths = CampaignPaths(".")
    return paths.relative(getattr(paths, name))


def _default_out(spec: specs.Spec) -> str:
    return str(CampaignPaths.default_root(spec.campaign.name))


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
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

    from orchestrator.plan import subset_size, validate_design

    spec = _load_spec(spec_file)
    data = load_dataset(spec.dataset.as_dict())
    validate_design(spec.campaign.design, spec.campaign.ratios, data.n_train, spec.campaign.runs,
                    f"[campaign] in {spec_file}")
    preflight(spec.to_dict(), data)
    click.echo(specs.dumps(spec))
    t = spec.campaign.runs
    rows = t * (data.n_train + data.n_test)
    from estimators import precision  # the one size and precision model, shared with `longtail plan`
    from orchestrator.fold import fixed_sizes

    shard_bytes = t * precision.shard_bytes(data.n_train, data.n_test)
    sizes_on_disk = fixed_sizes(spec, data)
    fold = sizes_on_disk["checkpoint"]
    e = spec.estimates
    dense = precision.influence_mode(e.influence, e.memory_gb, data.n_train, data.n_test, len(e.soft)) == "dense"
    infl = precision.dense_matrix_bytes(data.n_train, data.n_test) if dense else 0
    click.echo(f"# dataset {spec.dataset.name!r}: {data.n_train} train, {data.n_test} test examples, "
               f"{data.num_classes} classes, inputs {data.input_shape}")
    sizes = ", ".join(f"{subset_size(r, data.n_train)}" for r in spec.campaign.ratios)
    click.echo(f"# work: {t} runs x {data.n_train + data.n_test} examples = {rows:,} predictions; "
               f"each run trains on {'about ' if spec.campaign.design != 'fixed' else ''}{sizes} examples "
               f"({spec.campaign.design} design)")
    plan_bytes = precision.plan_bytes(t, data.n_train)
    other = sizes_on_disk["examples"] + fold + infl
    click.echo(f"# disk: about {format_bytes(shard_bytes + plan_bytes + other)}: {format_bytes(shard_bytes)} of shards, "
               f"{format_bytes(plan_bytes)} of plan, {format_bytes(sizes_on_disk['examples'])} example table, "
               f"{format_bytes(fold)} fold checkpoint ({_in_campaign('checkpoint')})"
               + (f", {format_bytes(infl)} dense influence estimate" if infl else ""))
    from estimators.estimates import error_bound

    c = spec.campaign
    main_runs = precision.main_ratio_runs(t, c.design, len(c.ratios), c.ratios.index(spec.primary_ratio))
    click.echo(f"# error bound (paper, RMS per estimate) at {main_runs} runs of ratio {spec.primary_ratio}: "
               f"{error_bound(main_runs, spec.primary_ratio):.3f}")


@main.command("spec-reference")
def spec_reference():
    """Print every spec key with its default, accepted values and meaning (Markdown)."""
    click.echo(specs.reference_markdown())


def _run(spec: specs.Spec | None, out: str, address: str | None, progress: bool, top: int,
         dashboard_host: str = "127.0.0.1", dashboard_port: int = 8265, as_job: bool = True) -> None:
    from cluster import embedded
    from orchestrator.campaign import create_or_open
    from cluster.connect import check_ray_address
    from orchestrator.driver import run_campaign

    # the command's start; a campaign run as a job on an embedded head counts from the `longtail run`
    # that started the head (embedded.STARTED_AT), so that "in all" covers the head's start-up too
    started_at = float(os.environ.get(embedded.STARTED_AT) or time.time())
    started = time.monotonic() - max(0.0, time.time() - started_at)
    _stop_on_sigterm()

    def say(msg: str) -> None:
        click.echo(f"longtail: {msg}", err=True)

    if address:
        check_ray_address(address)  # before the campaign directory is created
    as_job = as_job and embedded.wanted(address)  # the dashboard shows a job's driver log, with the progress
    if as_job:  # likewise: a port in use is refused before anything is written
        dashboard_port = embedded.free_dashboard_port(dashboard_host, dashboard_port, say)
    campaign = create_or_open(spec, out)
    for note in campaign.notes:
        say(note)
    if as_job:
        sys.exit(embedded.run_as_job(campaign, progress, top, dashboard_host, dashboard_port, say, started_at))
    report = run_campaign(campaign, address=address, progress=progress, dashboard_host=dashboard_host)
    report.seconds = time.monotonic() - started  # the command's wall time: dataset, checks and estimates too
    _print_result(campaign.paths, report.summary, top, report)
    if not report.complete:
        click.echo(f"longtail: the campaign ended incomplete ({report.summary['runs']['folded']} of "
                   f"{campaign.plan.runs} runs folded, {len(report.failed)} failed within the failure budget); "
                   f"exit status {EXIT_INCOMPLETE}. `longtail resume {campaign.paths.root}` retries the missing runs",
                   err=True)
        sys.exit(EXIT_INCOMPLETE)


def _stop_on_sigterm() -> None:
    """`ray job stop` and `kill` send SIGTERM: save the fold and exit as on Ctrl-C, not abruptly."""
    from cluster.connect import interrupt_on_sigterm

    interrupt_on_sigterm()


def _print_result(paths, summary: dict, top: int, report=None) -> None:
    runs = summary["runs"]
    if report is not None:
        rate = report.trained / report.training_seconds if report.trained and report.training_seconds else 0
        click.echo(f"trained {report.trained} runs in {report.training_seconds:.1f} s"
                   + (f" ({rate:.1f} runs/s)" if rate else "")
                   + f", {report.seconds:.1f} s in all with start-up and estimates"
                   + (f" (estimates {report.estimate_seconds:.1f} s)" if report.estimate_seconds else "")
                   + f"; {report.already_done} were already done")
        if report.failed:
            click.echo(f"{len(report.failed)} runs failed (see {paths.failed_dir}); "
                       f"`longtail resume {paths.root}` retries them")
    acc = summary.get("test_accuracy") or {}
    click.echo(f"{runs['folded']}/{runs['planned']} runs folded"
               + (f"; test accuracy {acc['mean']:.3f} ± {acc['std']:.3f} (mean ± sd over runs)" if acc else ""))
    dense = f"{paths.influence.name}, {paths.pairs.name}, " if paths.influence.exists() else ""
    click.echo(f"estimates in {paths.estimates_dir}/ ({paths.memorization.name}, {dense}{paths.summary.name})")
    if top:
        show_top(paths, top, summary)


def _number(value, fmt: str) -> str:
    """A figure, or why there is none (summary.json holds null where too few runs give no value)."""
    return "n/a (too few runs)" if value is None else format(value, fmt)


def _print_figures(summary: dict) -> None:
    """The paper's figures from summary.json, when the campaign has them."""
    mem = summary.get("memorization") or {}
    if mem.get("share_at_least") and mem.get("mean") is not None:  # None before any run is folded
        shares = ", ".join(f">= {t}: {v:.1%}" for t, v in mem["share_at_least"].items() if v is not None)
        click.echo(f"  memorization: mean {mem['mean']:.3f}; share of training examples {shares}")
    pairs = summary.get("high_influence_pairs")
    if pairs:
        click.echo(f"  high-influence pairs (mem >= {pairs['mem_threshold']}, infl >= {pairs['infl_threshold']}): "
                   f"{pairs['pairs']} pairs, {pairs['test_examples']} test examples, "
                   f"{pairs['test_examples_with_one_influencer']} with a single influencer")
    half = summary.get("split_half")
    if half:
        click.echo(f"  split halves ({half['runs'][0]} + {half['runs'][1]} runs): memorization correlation "
                   f"{_number(half.get('memorization_correlation'), '.3f')}, memorized-set Jaccard (>= 0.25) "
                   f"{_number(half.get('memorized_jaccard_0.25'), '.2f')}"
                   + (f", pairs Jaccard {_number(half['pairs_jaccard'], '.2f')}" if "pairs_jaccard" in half else ""))
    bound = summary.get("error_bound_rms")
    if bound is not None:
        main_runs = next((g["runs"] for g in summary.get("ratios", []) if g["subset_ratio"] == summary["subset_ratio"]),
                         summary["runs"]["folded"])
        click.echo(f"  error bound (paper, RMS per estimate) at {main_runs} runs of ratio {summary['subset_ratio']}: "
                   f"{bound:.3f}")


def show_top(paths, k: int, summary: dict | None = None) -> None:
    from orchestrator.estimates_files import read_memorization
    from orchestrator.features import proxies

    t = read_memorization(paths).to_pandas()
    t = t[t["mem"].notna()].sort_values(["mem", "example"], ascending=[False, True]).head(k)
    triage = proxies.read_triage(paths)  # None for estimates written before triage existed
    click.echo(f"\nthe {k} most memorized training examples (estimate ± standard error"
               + ("; triage by the out-of-subset predictions: mode class and its share" if triage is not None else "")
               + "):")
    click.echo(f"{'example':>8} {'label':>5}  {'memorization':>15}  {'in-acc':>6} {'out-acc':>7} {'runs in/out':>12}"
               + ("  triage" if triage is not None else ""))
    for row in t.itertuples():
        click.echo(f"{row.example:>8} {row.label:>5}  {row.mem:>7.3f} ± {row.se:.3f}  {row.acc_in:>6.3f} "
                   f"{row.acc_out:>7.3f} {f'{row.n_in}/{row.n_out}':>12}"
                   + (f"  {proxies.describe(triage, row.example)}" if triage is not None else ""))
    line = proxies.one_line(summary or {})
    if line:
        click.echo(line)


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
@click.option("--dashboard-port", default=8265, show_default=True, help="port of the embedded cluster's dashboard")
@click.option("--in-process", is_flag=True,
              help="drive the embedded campaign from this process instead of as a Ray job (the dashboard then "
                   "shows no driver log, so no progress)")
def run(spec_file, out, address, progress, top, dashboard_host, dashboard_port, in_process):
    """Run the campaign SPEC_FILE describes; continue it if it already exists.

    Starts an embedded local Ray (dashboard on 127.0.0.1) unless --address is given (or the
    RAY_ADDRESS of a Ray job is set). Finished runs are never trained again; estimates/ is updated
    while the campaign runs.
    """
    spec = _load_spec(spec_file)
    _run(spec, out or _default_out(spec), address, progress, top, dashboard_host,
         dashboard_port=dashboard_port, as_job=not in_process)


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
    from orchestrator.campaign import create_or_open
    from orchestrator.estimates_files import read_summary
    from orchestrator.lock import DriverLock

    campaign_dir = target
    c = create_or_open(None, campaign_dir, load_data=False)
    finished = c.finished_runs()
    failed = c.failed_runs() - finished
    try:
        summary = read_summary(c.paths) or {}
    except ValueError:
        summary = {}  # rewritten at the next checkpoint; the counts below come from the directory itself
    lock = DriverLock(c.paths.lock)
    holder = lock.holder() if c.paths.lock.exists() else None
    dead = lock.stale_reason(holder) if holder else ""
    running = holder if holder and not dead else None
    pace = _pace(c, finished, running) if running else None
    state = ("complete" if summary.get("complete") and len(finished) >= c.plan.runs or summary.get("stopped_early")
             else "running" if running else "incomplete")
    info = {"campaign": c.name, "directory": str(c.paths.root), "runs_planned": c.plan.runs,
            "runs_finished": len(finished), "runs_failed": len(failed), "failure_reasons": c.failure_reasons(),
            "runs_folded": summary.get("runs", {}).get("folded", 0), "complete": state == "complete",
            "state": state, "target_se": summary.get("target_se"), "stopped_early": summary.get("stopped_early"),
            "driver": running, "stale_lock": {"holder": holder, "why": dead} if dead else None, "pace": pace}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"campaign {c.name!r} in {c.paths.root}: {state}")
    click.echo(f"  runs: {len(finished)}/{c.plan.runs} finished, {info['runs_folded']} folded into estimates, "
               f"{len(failed)} failed")
    if running:
        click.echo(f"  driver: pid {holder['pid']} on {holder['host']} since {holder['started']}")
    elif dead:
        click.echo(f"  driver: none running (the lock names pid {holder.get('pid')} on {holder.get('host')}, but "
                   f"{dead}; run or resume takes the lock over)")
    else:
        click.echo("  driver: none running")
    if pace:
        eta = f", about {format_seconds(pace['eta_seconds'])} left" if pace["eta_seconds"] is not None else ""
        click.echo(f"  pace: {pace['runs_per_second']:.3g} runs/s over {pace['runs']} runs since the driver "
                   f"started{eta}")
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
    if state == "incomplete":
        click.echo(f"  continue with: longtail resume {c.paths.root}")


def _pace(c, finished: set[int], holder: dict) -> dict | None:
    """Runs per second since the running driver started (from the shards' modification times) and the time
    left at that pace; None when its start cannot be read."""
    try:
        started = time.mktime(time.strptime(holder["started"][:19], "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, TypeError, ValueError):
        return None
    recent = 0
    for r in finished:
        try:
            recent += c.paths.shard(r).stat().st_mtime >= started
        except OSError:
            continue
    elapsed = max(time.time() - started, 1e-9)
    rate = recent / elapsed
    left = c.plan.runs - len(finished)
    return {"runs": recent, "seconds": round(elapsed, 1), "runs_per_second": rate,
            "eta_seconds": left / rate if rate > 0 else None}


def _job_status(submission_id: str, address: str, as_json: bool) -> None:
    from cluster import jobs

    info = jobs.info(address, submission_id)
    progress = jobs.last_progress(jobs.logs(address, submission_id))
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
    from cluster import jobs

    spec = _load_spec(spec_file)
    out = out or CampaignPaths.default_cluster_root(spec.campaign.name)
    submission_id = jobs.submit(spec, address, out, list(modules))
    click.echo(f"submitted campaign {spec.campaign.name!r} as job {submission_id}")
    click.echo(f"campaign directory on the cluster: {out}")
    from cluster.dashboard import url_line

    click.echo(f"{url_line(address.rstrip('/'))}: Jobs > {submission_id} shows the driver log with the progress")
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
    from cluster import jobs

    if follow:
        for chunk in jobs.follow(address, submission_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(jobs.logs(address, submission_id), nl=False)


@main.command()
@click.argument("submission_id")
@click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS", help="the cluster's job API")
def stop(submission_id, address):
    """Stop a submitted campaign. Finished runs are kept; submit the spec again to resume it."""
    from cluster import jobs

    final = jobs.stop(address, submission_id)
    click.echo(f"job {submission_id}: {final}")
    if final not in jobs.TERMINAL:
        _fail(f"the job did not stop within 60 s; check `longtail status {submission_id} --address {address}`", 1)


def _fold_pool(address: str, root, actors: int):
    """Fold actors on the cluster at `address` (orchestrator/foldpool.py)."""
    from cluster.connect import _ray_init
    from orchestrator.foldpool import FoldPool

    ray, _, _ = _ray_init(address)
    return FoldPool(ray, root, actors)


@main.command()
@click.argument("campaign_dir")
@click.option("--top", default=10, show_default=True)
@click.option("--address", default=None, help="with --fold-actors: the Ray cluster (e.g. 10.0.0.10:6379) whose "
              "nodes read and verify the shards; they must see CAMPAIGN_DIR")
@click.option("--fold-actors", type=click.IntRange(min=0), default=0, show_default=True,
              help="read and verify the shards with this many actors of the cluster at --address "
                   "(orchestrator/foldpool.py); 0: in this process")
def estimate(campaign_dir, top, address, fold_actors):
    """Recompute estimates/ of CAMPAIGN_DIR from its shards alone (no dataset, no checkpoint; no Ray
    unless --fold-actors spreads the reading over a cluster)."""
    from orchestrator.fold import Aggregator
    from orchestrator.campaign import create_or_open
    from orchestrator.driver import RunReport, fold_existing
    from orchestrator.estimates_files import write_estimates

    if fold_actors and not address:
        _fail("--fold-actors needs the cluster's --address (e.g. --address 10.0.0.10:6379); without a "
              "cluster, leave --fold-actors out and this process reads the shards", 2)
    c = create_or_open(None, campaign_dir, load_data=False)
    agg = Aggregator(c, from_scratch=True)
    report = RunReport(planned=c.plan.runs, already_done=0)
    pool = _fold_pool(address, c.paths.root, fold_actors) if fold_actors else None
    fold_existing(c, agg, report, reject=False, pool=pool)  # a recompute reads the campaign and moves nothing
    agg.flush()  # the buffered shards count towards completeness
    summary = write_estimates(agg, complete=bool(agg.folded.all()))
    _print_result(c.paths, summary, top)
    if report.rejected:
        click.echo(f"warning: {len(report.rejected)} shards could not be read and were left out (runs "
                   f"{', '.join(map(str, report.rejected[:10]))}{' ...' if len(report.rejected) > 10 else ''}); "
                   f"`longtail resume {c.paths.root}` sets them aside and trains those runs again", err=True)


@main.command()
@click.argument("campaign_dir")
@click.option("--format", "fmt", type=click.Choice(["fz", "parquet"]), required=True,
              help="fz: the paper's released .npz layouts; parquet: tables keyed by example id")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="output directory (default: CAMPAIGN_DIR/export)")
def export(campaign_dir, fmt, dest):
    """Export the estimates of CAMPAIGN_DIR (from its fold checkpoint) for other tools."""
    from orchestrator.fold import Aggregator
    from orchestrator.campaign import create_or_open
    from orchestrator.estimates_files import export_fz, export_parquet

    c = create_or_open(None, campaign_dir, load_data=False)
    agg = Aggregator(c)
    if agg.stats.runs == 0:
        _fail(f"{c.paths.root} has no folded runs yet; run or resume the campaign first")
    if dest is None and "://" in campaign_dir:
        _fail("exports are written to a local directory: give --dest for a campaign on an object store")
    files = (export_fz if fmt == "fz" else export_parquet)(agg, Path(dest) if dest else c.paths.export_dir)
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


@main.command("proxies")
@click.argument("campaign_dir")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def proxies_command(campaign_dir, as_json):
    """Print how well training-dynamics proxies (cumulative loss, learning time, forgetting events) agree
    with the memorization of CAMPAIGN_DIR, from estimates/proxy_agreement.parquet, per number of runs."""
    from orchestrator.features import proxies
    from orchestrator.campaign import create_or_open

    try:
        c = create_or_open(None, campaign_dir, load_data=False)
        rows = proxies.read_agreement(c.paths)
    except _errors() as e:
        _fail(str(e))
    if rows is None:
        _fail(f"{c.paths.estimates_dir} has no {c.paths.proxy_agreement.name}: {proxies.NO_DYNAMICS}; if the shards "
              f"have dynamics, `longtail estimate {campaign_dir}` writes it")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo("agreement of each proxy (averaged over the first RUNS runs) with memorization, 95% bootstrap CI:")
    for line in proxies.format_table(rows):
        click.echo(line)


@main.command("tune")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--samples", default=16, show_default=True, help="trials (random points of the search space)")
@click.option("--max-epochs", type=int, default=None, help="most epochs a trial trains (default: 2 x [train] epochs)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the tuned spec (default: SPEC_FILE with .tuned.toml)")
@click.option("--address", default=None, help="join the Ray cluster at ADDR instead of starting a local one")
def tune_command(spec_file, samples, max_epochs, out, address):
    """Tune SPEC_FILE's learning rate, weight decay and epochs at its subset ratio (Ray Tune, ASHA), scored
    on the training examples outside the subset, and write the best recipe into a new spec."""
    from orchestrator.features.tune import tune_recipe, tuned_spec

    spec = _load_spec(spec_file)
    max_epochs = max_epochs or 2 * spec.train.epochs
    best = tune_recipe(spec, samples, max_epochs, address)  # errors: one line, from the CLI's handler
    new = tuned_spec(spec, best)
    path = Path(out) if out else Path(spec_file).with_suffix(".tuned.toml")
    path.write_text(f"# tuned by `longtail tune {spec_file}`: {best['trials']} trials, best held-out accuracy "
                    f"{best['heldout_accuracy']:.4f}\n" + specs.dumps(new))
    t = spec.train
    click.echo(f"{best['trials']} trials ({best['failed_trials']} failed); best held-out accuracy "
               f"{best['heldout_accuracy']:.4f} at subset ratio {spec.primary_ratio}")
    click.echo(f"  lr           {t.lr:g} -> {new.train.lr:g}")
    click.echo(f"  weight_decay {t.weight_decay:g} -> {new.train.weight_decay:g}")
    click.echo(f"  epochs       {t.epochs} -> {new.train.epochs}")
    click.echo(f"wrote {path}; check it with: longtail validate {path}")


@main.command("utility")
@click.argument("campaign_dir")
@click.option("--thresholds", default="0.25,0.5", show_default=True,
              help="memorization thresholds, comma-separated: each removes the examples with mem >= it")
@click.option("--runs", type=click.IntRange(min=2), default=5, show_default=True,
              help="models trained per condition (a standard error needs at least 2)")
@click.option("--pairs/--no-pairs", default=None,
              help="also remove the training examples of the high-influence pairs (default: on when the campaign "
                   "found pairs)")
@click.option("--address", default=None, envvar="LONGTAIL_RAY_ADDRESS",
              help="join the Ray cluster at ADDR instead of starting a local one")
@click.option("--progress/--no-progress", default=True, help="show the progress display")
def utility_command(campaign_dir, thresholds, runs, pairs, address, progress):
    """The marginal utility of memorized examples (Feldman & Zhang 2020, Fig. 2 and Sec. 3.3).

    Retrains the campaign's recipe on the FULL training set of CAMPAIGN_DIR minus the examples with
    memorization >= each threshold, minus as many random examples, and minus the training examples of
    the high-influence pairs, RUNS models each, and compares their test accuracy with models trained on
    the full set. Results in CAMPAIGN_DIR/utility/; rerunning trains only what is missing."""
    from orchestrator.features.utility import format_report, parse_thresholds, run_utility

    values = parse_thresholds(thresholds)  # errors: one line, from the CLI's handler (orchestrator/cli.py)
    report = run_utility(campaign_dir, values, runs=runs, pairs=pairs, address=address, progress=progress)
    click.echo(format_report(report))

@main.command("plan")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--pilot", type=click.IntRange(min=2), default=8, show_default=True,
              help="runs of the pilot campaign the costs are measured on")
@click.option("--address", default=None, envvar="LONGTAIL_RAY_ADDRESS",
              help="measure on the Ray cluster at ADDR instead of an embedded local one")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--progress/--no-progress", default=True, help="show the pilot's progress display")
def plan_command(spec_file, pilot, address, as_json, progress):
    """What the campaign SPEC_FILE describes will cost, from a short pilot on the target cluster.

    Runs PILOT runs of the spec in a temporary directory (deleted afterwards), then states seconds
    per run, throughput, expected wall time, GPU- or CPU-hours, storage, and the standard error the
    estimates will reach, with the runs needed for a target standard error."""
    from orchestrator.features.cost import format_plan, measure_pilot

    spec = specs.load(spec_file)  # errors: one line, from the CLI's handler (orchestrator/cli.py)
    plan = measure_pilot(spec, pilot, address, progress, spec_file)
    from orchestrator.estimates_files import json_safe

    click.echo(json.dumps(json_safe(plan), indent=2) if as_json else format_plan(plan))

@main.command("report")
@click.argument("campaign_dir")
def report_command(campaign_dir):
    """Write CAMPAIGN_DIR/report/index.html: one self-contained page with the campaign's figures.

    It can be written while the campaign runs (it then says how many runs it stands on)."""
    from orchestrator.features.report import write_report

    path, notes = write_report(campaign_dir)  # errors: one line, from the CLI's handler (orchestrator/cli.py)
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"report: {path}")

@main.command("monitor")
@click.option("--ray-temp-dir", default=None,
              help="Ray's temp dir on this machine (default: $RAY_TMPDIR or /tmp; `ray start --temp-dir` sets it)")
@click.option("--port", default=9090, show_default=True, help="port of Prometheus, on 127.0.0.1")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default="~/.longtail/prometheus",
              show_default=True, help="where Prometheus keeps its config and time series")
@click.option("--scrape-interval", default="10s", show_default=True,
              help="how often each node's metrics are read (Prometheus duration)")
def monitor_command(ray_temp_dir, port, data_dir, scrape_interval):
    """Chart the campaign's metrics: start Prometheus on this Ray cluster's metrics and print its graph page.

    Run it on the head node (where `longtail run` or `ray start --head` runs) while or before a
    campaign runs; it stays in the foreground until Ctrl-C. The series keep their history in --data."""
    import subprocess
    import signal
    from cluster.monitor import MonitorError, QUERIES, command, discovery_file, graph_url

    discovery = discovery_file(ray_temp_dir)
    try:
        cmd = command(Path(data_dir).expanduser(), discovery, port, scrape_interval)
    except MonitorError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not discovery.exists():
        click.echo(f"longtail: no Ray cluster has written {discovery} yet; Prometheus reads it as soon as one "
                   f"starts (another Ray temp dir? give --ray-temp-dir)", err=True)
    click.echo(f"longtail: Prometheus at http://127.0.0.1:{port}, scraping the nodes listed in {discovery} "
               f"every {scrape_interval}", err=True)
    click.echo(f"longtail: the campaign's charts ({', '.join(name for name, _ in QUERIES)}): {graph_url(port)}",
               err=True)
    click.echo("longtail: Grafana is not needed; on a remote head, tunnel the port: "
               f"ssh -L {port}:127.0.0.1:{port} HEAD", err=True)
    log = Path(data_dir).expanduser() / "prometheus.log"
    with open(log, "ab") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        return
    click.echo(f"error: Prometheus exited with status {code} (port {port} taken? another --data?); its log: {log}",
               err=True)
    sys.exit(1)

@main.command("audit")
@click.argument("campaign_dir")
@click.argument("targets", nargs=-1)
@click.option("--runs", "run_range", default=None,
              help="also audit this campaign's runs START:STOP (their shards; each is taken out of the fit)")
@click.option("--variance", type=click.Choice(["auto", "global", "per-example"]), default="auto", show_default=True,
              help="per-example variances, or one per side shared by all examples (better with few runs)")
@click.option("--out", "dest", type=click.Path(file_okay=False), default=None,
              help="directory for the scores (default: CAMPAIGN_DIR/audit)")
def audit_command(campaign_dir, targets, run_range, variance, dest):
    """Membership scores of TARGET models on CAMPAIGN_DIR's training examples (likelihood-ratio attack).

    TARGET is a run shard of this or another campaign on the same dataset, or a table of a model's
    outputs (docs/audit.md). Writes one Parquet file of online and offline scores per target; with
    known membership also prints ROC AUC and TPR at 0.1% and 1% FPR against the loss-threshold baseline."""
    import numpy as np
    from workers.storage import atomic_write_text
    from orchestrator.features.audit import AuditError, parse_runs, evaluate, format_metrics, load_target, open_for_audit, score, write_scores

    if not targets and not run_range:
        raise AuditError("no target: give TARGET files or --runs START:STOP (docs/audit.md)")
    agg = open_for_audit(campaign_dir)
    c = agg.c
    paths = list(targets)
    if run_range:
        missing = [r for r in parse_runs(run_range, c.plan.runs) if not c.paths.shard(r).exists()]
        if missing:
            raise AuditError(f"--runs {run_range}: runs {missing[:5]}{'...' if len(missing) > 5 else ''} have no "
                             f"shard in {c.paths.runs_dir}; resume the campaign or choose finished runs")
        paths += [str(c.paths.shard(r)) for r in parse_runs(run_range, c.plan.runs)]
    if dest is None and "://" in campaign_dir:
        raise AuditError("scores are written to a local directory: give --out for a campaign on an object store")
    out = Path(dest) if dest else Path(CampaignPaths(campaign_dir).audit_dir)
    out.mkdir(parents=True, exist_ok=True)
    gv = {"auto": "auto", "global": True, "per-example": False}[variance]
    results = [score(agg, load_target(agg, t), gv) for t in paths]
    files = [write_scores(out, s, c, agg.risk_source) for s in results]
    metrics = evaluate(results)
    report = {"campaign": c.name, "statistic": agg.risk_source, "global_variance": results[0].fits.global_variance,
              "shadow_runs": int(agg.risk.count_in[0] + agg.risk.count_out[0]),
              "targets": [{"name": s.target.name, "kind": s.target.kind, "run": s.target.run} for s in results],
              "metrics": metrics}
    from orchestrator.estimates_files import json_safe

    atomic_write_text(AuditPaths(out).summary, json.dumps(json_safe(report), indent=2) + "\n")
    click.echo(f"audited {len(results)} targets against {report['shadow_runs']} runs of {c.name!r} (statistic "
               f"{agg.risk_source}, {'global' if report['global_variance'] else 'per-example'} variance); a run "
               f"of this campaign is taken out of the fit before it is scored")
    for s in results[:5]:
        top = np.argsort(-np.nan_to_num(s.online, nan=-np.inf))[:5]
        click.echo(f"  {s.target.name}: highest online scores at examples {top.tolist()}")
    if metrics:
        click.echo(format_metrics(metrics))
    click.echo(f"scores in {out}/ ({len(files)} files and {AuditPaths(out).summary.name})")

@main.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--test", "test", default=None, help="test example ids (comma-separated) whose influence is compared")
@click.option("--index-map", default=None, type=click.Path(exists=True, dir_okay=False),
              help="for a released-format B: .npy of the campaign's id of each of the file's training examples "
                   "(or .npz with train and test arrays)")
@click.option("--out", "dest", default=None, type=click.Path(file_okay=False),
              help="directory for the comparison (default: A/compare/<name of B>)")
@click.option("--top", default=10, show_default=True, help="examples listed per direction")
def compare_command(a, b, test, index_map, dest, top):
    """Per-example differences between campaigns A and B on the same dataset: memorization, held-out accuracy
    and influence on chosen test examples, paired when A and B share seed, design and ratio."""
    from orchestrator.features.compare import parse_test_ids, compare, summarize, write

    comp, agg = compare(a, b, parse_test_ids(test), index_map)
    summary = summarize(comp, top)
    b_name = Path(b).stem if Path(b).is_file() else Path(b).name
    out = Path(dest) if dest else Path(CampaignPaths(a).compare_dir(b_name))
    files = write(comp, summary, out, agg.c.name, b_name)
    m = summary["memorization"]
    click.echo(f"{'PAIRED' if comp.paired else 'UNPAIRED'} comparison: {comp.why}")
    click.echo(f"memorization A - B: mean {m['mean_diff']:+.4f}, mean standard error {m['mean_se']:.4f}, "
               f"{m['significant_at_2se']} examples beyond 2 standard errors; Spearman {m['spearman']:.3f}")
    if "held_out_accuracy" in summary:
        h = summary["held_out_accuracy"]
        click.echo(f"held-out accuracy A - B: mean {h['mean_diff']:+.4f} (mean standard error {h['mean_se']:.4f})")
    if "influence" in summary:
        i = summary["influence"]
        click.echo(f"influence on {len(i['test_examples'])} test examples: mean |A - B| {i['mean_abs_diff']:.4f} "
                   f"(mean standard error {i['mean_se']:.4f})")
    for title, rows in (("increased most", summary["increased_most"]), ("decreased most", summary["decreased_most"])):
        click.echo(f"memorization {title}: " + ", ".join(f"{r['example']} ({r['diff']:+.3f} ± {r['se']:.3f})"
                                                         for r in rows[:5]))
    click.echo(f"written: {', '.join(str(f) for f in files)}")

@main.command("selftest")
@click.option("--address", default=None, envvar="LONGTAIL_RAY_ADDRESS",
              help="the Ray cluster a campaign would use (default: an embedded local one)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="keep the self-test campaign in this new directory (default: a temporary one, removed on PASS)")
@click.option("--runs", type=click.IntRange(min=100), default=400, show_default=True, help="runs of the self-test")
def selftest_command(address, out, runs):
    """Check a cluster and this installation end to end in under a minute: a small campaign of a learner whose
    memorization and influence are known exactly, on every node; prints PASS or what failed."""
    import shutil
    from orchestrator.features.selftest import SelftestFailed, run_selftest

    checks, root = run_selftest(address, out, runs)
    for ch in checks:
        click.echo(f"  {'ok  ' if ch.ok else 'FAIL'} {ch.name}: {ch.detail}")
    failed = [ch.name for ch in checks if not ch.ok]
    if failed:
        raise SelftestFailed(f"selftest FAILED ({', '.join(failed)}); the campaign is kept in {root} for inspection")
    if out is None:
        shutil.rmtree(root.parent, ignore_errors=True)
    click.echo("PASS")


if __name__ == "__main__":  # pragma: no cover
    main()
