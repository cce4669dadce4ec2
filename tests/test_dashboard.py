"""What a user sees of a running campaign on the Ray dashboard, in a real browser (headless Chromium
through Playwright, the system's /usr/bin/chromium), and in Prometheus through `longtail monitor`.

Each test runs its own Ray with the dashboard and token authentication (the suite's shared session
has neither) in subprocesses with a private HOME (so a private token), RAY_TMPDIR and free ports;
every process they start carries a marker in its environment and is SIGKILLed by it at the end,
whatever happened (`ray stop` would kill every Ray on the machine).

The campaign's pace is the test's: its trainer waits while a pause file exists, so the campaign
holds still while its progress is read from the dashboard, from Prometheus and from `longtail
status`, and those numbers must be equal, not merely close.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from test_cluster import free_port, processes_with  # the same helpers as the cluster tests

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# without the background-networking flags Chromium tries to reach Google and its connections fail here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
RUNS = 60

def with_browser(test):
    """An end-to-end test with its own Ray, a campaign and Chromium."""
    test = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                              reason="needs Chromium: `make test` installs Debian's chromium")(test)
    return pytest.mark.slow(test)

SPEC = f"""
[campaign]
name = "watched"
seed = 3
runs = {RUNS}
subset_ratio = 0.5
[dataset]
name = "dashboard_plugins:blobs"
n_train = 40
n_test = 20
sleep = 0.05
fail_every = 4
pause_file = "{{pause}}"
[model]
name = "mlp"
[train]
trainer = "dashboard_plugins:paced_knn"
[resources]
local_cpus = 2
max_failures = 0.6
[estimates]
checkpoint_seconds = 1
"""


class Sandbox:
    """A private environment for a Ray of our own, and the processes started in it."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.mark = f"lt-dash-{uuid.uuid4().hex}"
        self.ray_tmp = tempfile.mkdtemp(prefix="lt-d-")  # short: Ray's socket paths are limited to 107 chars
        self.pause = tmp_path / "pause"
        self.pause.touch()
        (tmp_path / "home").mkdir()
        self.spec = tmp_path / "s.toml"
        self.spec.write_text(SPEC.format(pause=self.pause))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # conftest's RAY_AUTH_MODE too
        env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=self.ray_tmp, RAY_USAGE_STATS_ENABLED="0",
                   LONGTAIL_PROGRESS_SECONDS="1", RAY_metrics_report_interval_ms="1000", LONGTAIL_TEST_MARK=self.mark,
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples"), str(ROOT / "tests")]))
        self.env = env
        self.procs: list[subprocess.Popen] = []

    def start(self, *args, log: str) -> subprocess.Popen:
        p = subprocess.Popen(list(args), env=self.env, cwd=self.dir, stdout=open(self.dir / log, "w"),
                             stderr=subprocess.STDOUT)
        p.log = self.dir / log
        self.procs.append(p)
        return p

    def longtail(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], env=self.env, cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout)

    def token(self) -> str:
        return (self.dir / "home" / ".ray" / "auth_token").read_text().strip()

    def cleanup(self) -> None:
        """SIGKILL every process that carries this sandbox's mark (Ray's daemons included)."""
        for _ in range(3):  # a process may start another while it is being killed
            found = processes_with(f"LONGTAIL_TEST_MARK={self.mark}")
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not found:
                break
            time.sleep(0.3)
        for p in self.procs:
            p.wait(timeout=10)
        if os.environ.get("LONGTAIL_KEEP_RAY_TMP") != "1":  # Ray's own logs, to see why a test failed
            shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path)
    try:
        yield box
    finally:
        box.cleanup()


def wait_for(what: str, check, timeout: float, procs=(), interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                tail = "".join(p.log.read_text().splitlines(True)[-15:]) if hasattr(p, "log") else ""
                raise AssertionError(f"{p.args[:4]} exited with {p.returncode} while waiting for {what}:\n{tail}")
        time.sleep(interval)
    tails = "".join(f"\n--- {p.args[:4]}:\n" + "".join(p.log.read_text().splitlines(True)[-10:])
                    for p in procs if hasattr(p, "log"))
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tails}")


def campaign_state(box: Sandbox, out: Path) -> dict:
    r = box.longtail("status", out, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def settled_count(out: Path) -> int:
    """Runs finished or failed, from the campaign directory."""
    return sum(len(list((out / d).glob(pattern))) if (out / d).exists() else 0
               for d, pattern in (("runs", "run-*.parquet"), ("failed", "run-*.json")))


def advance_and_hold(box: Sandbox, out: Path, at_least: int, procs) -> dict:
    """Let the campaign run until `at_least` runs are finished or failed, then hold it; returns
    `longtail status` once nothing moves any more (the runs past the pause check have finished)."""
    box.pause.unlink()
    wait_for(f"{at_least} runs", lambda: settled_count(out) >= at_least, 90, procs, interval=0.05)
    box.pause.touch()
    last, since = None, time.monotonic()
    while time.monotonic() - since < 2.0:  # a run sleeps 0.05 s past the pause check: 2 s unchanged is a standstill
        now = settled_count(out)
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.1)
    state = campaign_state(box, out)
    assert state["runs_finished"] + state["runs_failed"] == last < RUNS, (state, last)
    return state


PROGRESS = re.compile(r"runs (\d+)/(\d+) \([0-9.]+%\) of campaign 'watched', ([0-9.]+) runs/s, ETA \S+, "
                      r"\d+ in flight, (\d+) failed, (\d+) retried")


def read_job_page(url: str, token: str, submission_id: str, state: dict, shots: dict[str, Path]) -> str:
    """Sign in with the token, open the job's page, and wait until its driver log shows the campaign's
    progress as `longtail status` has it; returns the page's text. Screenshots go to `shots`."""
    from playwright.sync_api import sync_playwright

    want = (state["runs_finished"], RUNS, state["runs_failed"])
    seen = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="lt-chromium-"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(f"{url}/#/jobs", timeout=30_000)
            page.get_by_placeholder("Enter your authentication token").fill(token)
            page.get_by_role("button", name="Submit").click()
            page.get_by_text(submission_id).first.wait_for(timeout=30_000)
            if "jobs" in shots:
                page.screenshot(path=shots["jobs"])
            page.goto(f"{url}/#/jobs/{submission_id}")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                page.get_by_text("of campaign 'watched'").first.wait_for(timeout=30_000)
                lines = PROGRESS.findall(page.inner_text("body"))
                seen = max(((int(d), int(t), int(f)) for d, t, _, f, _ in lines), default=None)
                if seen == want:
                    break
                time.sleep(1)
                page.get_by_role("button", name="Refresh", exact=True).click()  # fetch the newest lines
            text = page.inner_text("body")
            if "job" in shots:
                page.screenshot(path=shots["job"], full_page=True)
        finally:
            browser.close()
    assert seen == want, f"the job page shows (done, planned, failed) = {seen}; longtail status says {want}"
    return text


def updating_screenshots() -> bool:
    return os.environ.get("LONGTAIL_UPDATE_SCREENSHOTS") == "1"


def screenshot(url: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="lt-chromium-"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1400, "height": 2900})  # tall: a full-page shot repeats the header
        try:
            page = browser.new_page()
            page.goto(url, timeout=30_000)
            page.wait_for_timeout(3000)  # the charts draw after their queries return
            page.screenshot(path=path)
        finally:
            browser.close()


def save_screenshots(shots: dict[str, Path]) -> None:
    """LONGTAIL_UPDATE_SCREENSHOTS=1 refreshes the ones docs/usage.md and docs/cluster.md show."""
    if updating_screenshots():
        SCREENSHOTS.mkdir(exist_ok=True)
        for path in shots.values():
            shutil.copy(path, SCREENSHOTS / path.name)


def prometheus_values(port: int) -> dict[str, float]:
    out = {}
    for name in ("runs_done_total", "runs_failed_total", "runs_per_second"):
        q = urllib.request.quote(f'ray_longtail_{name}{{campaign="watched"}}')
        try:
            body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={q}", timeout=5))
        except OSError:
            return {}
        result = body["data"]["result"]
        if result:
            out[name] = sum(float(r["value"][1]) for r in result)
    return out


def prometheus_agrees(port: int, state: dict, procs) -> dict[str, float]:
    """Wait until Prometheus has the runs done and failed that `longtail status` says; returns its values."""
    want, seen = (state["runs_finished"], state["runs_failed"]), {}

    def agrees():
        seen.update(prometheus_values(port))
        return (seen.get("runs_done_total"), seen.get("runs_failed_total")) == want and dict(seen)
    try:  # a scrape a second, a report from the driver a second, discovery of the cluster within 5 s
        return wait_for("Prometheus to agree with `longtail status`", agrees, 40, procs)
    except AssertionError as e:
        raise AssertionError(f"Prometheus has {seen}; longtail status says (done, failed) = {want}\n{e}") from None


@with_browser
def test_embedded_campaign_on_the_dashboard_and_in_prometheus(sandbox, tmp_path):
    """`longtail run` (embedded cluster, run as a Ray job) while `longtail monitor` runs Prometheus."""
    if shutil.which("prometheus") is None:
        pytest.fail("`prometheus` is not installed: `make test` installs Debian's package (apt-get install prometheus)")
    port, prom_port, out = free_port(), free_port(), tmp_path / "c"
    monitor = sandbox.start(sys.executable, "-m", "orchestrator.cli", "monitor", "--port", str(prom_port),
                            "--data", str(tmp_path / "prom"), "--scrape-interval", "1s", log="monitor.log")
    run = sandbox.start(sys.executable, "-m", "orchestrator.cli", "run", str(sandbox.spec), "--out", str(out),
                        "--dashboard-port", str(port), "--top", "0", log="run.log")
    log = lambda: (tmp_path / "run.log").read_text()  # noqa: E731
    sid = wait_for("the campaign's job", lambda: re.search(r"runs as job (longtail-watched-\S+):", log()), 180,
                   [run, monitor]).group(1)
    url = f"http://127.0.0.1:{port}"
    assert f"Ray dashboard at {url}; sign in with the token in {tmp_path / 'home' / '.ray' / 'auth_token'}" in log()

    first = advance_and_hold(sandbox, out, 16, [run, monitor])
    # Prometheus converges on exactly what the campaign directory says while the campaign holds still
    v1 = prometheus_agrees(prom_port, first, [run, monitor])
    shots = {"jobs": tmp_path / "dashboard-jobs.png", "job": tmp_path / "dashboard-embedded-job.png"}
    text = read_job_page(url, sandbox.token(), sid, first, shots)
    assert "longtail_campaign" in text and "watched" in text  # the job's metadata names the campaign

    second = advance_and_hold(sandbox, out, 36, [run, monitor])
    v2 = prometheus_agrees(prom_port, second, [run, monitor])
    assert v2["runs_done_total"] > v1["runs_done_total"] and v2["runs_failed_total"] > v1["runs_failed_total"]
    assert v1["runs_per_second"] > 0 and v2["runs_per_second"] > 0 and v2["runs_per_second"] != v1["runs_per_second"]
    if updating_screenshots():
        from cluster.monitor import graph_url

        shots["prometheus"] = tmp_path / "prometheus-graph.png"
        screenshot(graph_url(prom_port, "5m"), shots["prometheus"])

    sandbox.pause.unlink()
    # the job's exit status is the command's: 3 = ended incomplete, with failed runs within the budget
    assert run.wait(timeout=120) == 3, log()
    assert f"{RUNS - campaign_state(sandbox, out)['runs_failed']}/{RUNS} runs folded" in log()
    save_screenshots(shots)


@with_browser
def test_submitted_campaign_on_the_dashboard(sandbox, tmp_path):
    """`ray start --head` + `longtail submit`: the job page shows what `longtail status` says."""
    port, out = free_port(), tmp_path / "c"
    ray = str(Path(sys.executable).with_name("ray"))
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text(uuid.uuid4().hex)  # `ray start --head` turns token authentication on when a token exists
    r = subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port),
                        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                        "--temp-dir", sandbox.ray_tmp, "--disable-usage-stats"],
                       env=sandbox.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    url = f"http://127.0.0.1:{port}"
    r = sandbox.longtail("submit", sandbox.spec, "--address", url, "--out", out, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    sid = re.search(r"as job (\S+)", r.stdout).group(1)
    assert f"sign in with the token in {token}" in r.stdout  # submit prints the dashboard's address
    try:
        wait_for("the job's driver", lambda: (out / "plan").exists(), 120)
    except AssertionError as e:  # seen once in a full-suite run at load 2: say what the job was doing
        st = sandbox.longtail("status", sid, "--address", url, timeout=60)
        lg = sandbox.longtail("logs", sid, "--address", url, timeout=60)
        raise AssertionError(f"{e}\n--- longtail status:\n{st.stdout[-2000:]}{st.stderr[-1000:]}\n--- longtail logs:\n"
                             f"{lg.stdout[-3000:]}{lg.stderr[-1000:]}") from None

    state = advance_and_hold(sandbox, out, 16, [])
    shots = {"job": tmp_path / "dashboard-submitted-job.png"}
    read_job_page(url, token.read_text(), sid, state, shots)
    r = sandbox.longtail("status", sid, "--address", url)
    assert r.returncode == 0, r.stderr
    assert f"runs {state['runs_finished']}/{RUNS} " in r.stdout and f"{state['runs_failed']} failed" in r.stdout
    save_screenshots(shots)


# --- the pieces, without Ray ------------------------------------------------------------------------


def test_progress_line_names_the_campaign_and_reads_back():
    from cluster.jobs import last_progress
    from orchestrator.progress import Progress

    now = [0.0]
    bar = Progress(total=60, done=10, enabled=False, clock=lambda: now[0], campaign="watched")
    now[0] = 4.0
    bar.update(18, failed=3, in_flight=4, retried=2)
    line = bar.line()
    assert line == ("runs 18/60 (30.0%) of campaign 'watched', 2.00 runs/s, ETA 21s, 4 in flight, 3 failed, "
                    "2 retried")
    assert PROGRESS.fullmatch(line).groups() == ("18", "60", "2.00", "3", "2")  # what the browser test parses
    assert last_progress(f"longtail: note\n{line}\nsomething else\n") == line  # `longtail status ID`


def test_task_names_carry_their_runs():
    from orchestrator.driver import task_name

    assert task_name("c", [5]) == "longtail:c:run 5"
    assert task_name("c", list(range(32, 48))) == "longtail:c:runs 32-47"
    assert task_name("c", [3, 9, 12]) == "longtail:c:runs 3,9,12"


def test_every_dashboard_address_says_how_to_sign_in(monkeypatch, tmp_path):
    from cluster import dashboard

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert dashboard.url_line("http://127.0.0.1:8265") == (
        f"Ray dashboard at http://127.0.0.1:8265; sign in with the token in {tmp_path}/.ray/auth_token "
        f"(`ray get-auth-token` prints it)")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray/token")
    assert "the token in /etc/ray/token" in dashboard.url_line("http://h:1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert dashboard.url_line("http://h:1").endswith("no token needed (RAY_AUTH_MODE=disabled)")
    lines = dashboard.where_to_look("http://h:1", "longtail-c-1", "c")
    assert "Jobs > longtail-c-1" in lines[1] and "not the campaign's runs" in lines[2]


def test_embedded_job_joins_its_own_head():
    """The job supervisor would hand the driver any Ray found on the machine: the entrypoint names ours."""
    from types import SimpleNamespace

    from cluster.embedded import entrypoint

    c = SimpleNamespace(paths=SimpleNamespace(root=Path("/data/my campaign")))
    cmd = entrypoint(c, True, 5, "10.0.0.1:41234")
    assert cmd.startswith("cd ") and "RAY_ADDRESS=10.0.0.1:41234 exec " in cmd
    assert cmd.endswith("-m orchestrator.cli resume '/data/my campaign' --top 5 --progress")


def test_monitor_config_and_charts(tmp_path, monkeypatch):
    from urllib.parse import parse_qs, urlparse

    from cluster import monitor

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "rt"))
    found = monitor.discovery_file(None)
    assert found == tmp_path / "rt" / "ray" / "prom_metrics_service_discovery.json"
    assert monitor.discovery_file("/x/ray") == Path("/x/ray/prom_metrics_service_discovery.json")
    text = monitor.config_text(found, "2s")
    assert f"- {found}" in text and "scrape_interval: 2s" in text and "/tmp/ray/prom" not in text
    query = parse_qs(urlparse(monitor.graph_url(9091)).query)
    assert query["g0.expr"] == ["ray_longtail_runs_done_total"]
    exprs = {v[0] for k, v in query.items() if k.endswith(".expr")}
    assert {"ray_longtail_runs_failed_total", "ray_longtail_runs_per_second"} <= exprs


def test_monitor_without_prometheus_says_how_to_install_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus on it
    r = CliRunner().invoke(main, ["monitor", "--data", str(tmp_path / "p")])
    assert r.exit_code == 2
    assert "error: `prometheus` is not installed" in r.output and "apt-get install prometheus" in r.output
