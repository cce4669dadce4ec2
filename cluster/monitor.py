"""`longtail monitor`: the campaign's metrics as time series, with one command, on the head node.

Ray exports the ray_longtail_* metrics (orchestrator/metrics.py) on every node's metrics port and
writes the list of those ports to <ray temp dir>/prom_metrics_service_discovery.json, but starts no
Prometheus and no Grafana, so the dashboard's Metrics tab and charts stay empty. This starts
Prometheus (the Debian/Ubuntu package `prometheus`) on that discovery file, bound to loopback, and
prints the address of its graph page with the campaign's queries filled in. Grafana is in no package
registry reachable here (not in Debian, not on PyPI or npm); Prometheus's own graph page is the chart.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlencode


# what each chart shows: Prometheus expressions over the series the driver exports
QUERIES = (
    ("runs done", "ray_longtail_runs_done_total"),
    ("runs per second", "ray_longtail_runs_per_second"),
    ("share of the plan done", "ray_longtail_progress"),
    ("runs failed", "ray_longtail_runs_failed_total"),
    ("runs retried", "ray_longtail_runs_retried_total"),
    ("runs in flight", "ray_longtail_runs_in_flight"),
)


class MonitorError(RuntimeError):
    pass


def discovery_file(ray_temp_dir: str | None) -> Path:
    """Ray keeps <temp dir>/ray/prom_metrics_service_discovery.json pointing at the current session's list."""
    base = Path(ray_temp_dir or os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    return (base if base.name == "ray" else base / "ray") / "prom_metrics_service_discovery.json"


def config_text(discovery: Path, scrape_interval: str) -> str:
    """cluster/prometheus.yml with this machine's discovery file and the wanted scrape interval."""
    template = (Path(__file__).resolve().parents[1] / "cluster" / "prometheus.yml").read_text()
    text = template.replace("/tmp/ray/prom_metrics_service_discovery.json", str(discovery))
    for key in ("scrape_interval", "evaluation_interval"):
        text = text.replace(f"{key}: 10s", f"{key}: {scrape_interval}")
    return text


def graph_url(port: int, window: str = "30m") -> str:
    params = {}
    for k, (_, expr) in enumerate(QUERIES):
        params.update({f"g{k}.expr": expr, f"g{k}.tab": "0", f"g{k}.range_input": window})
    return f"http://127.0.0.1:{port}/graph?{urlencode(params)}"


def command(data_dir: Path, discovery: Path, port: int, scrape_interval: str) -> list[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise MonitorError("`prometheus` is not installed on this machine: install it with "
                           "`sudo apt-get install prometheus` (Debian/Ubuntu; `make test` does), then run "
                           "`longtail monitor` again")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "prometheus.yml"
    config.write_text(config_text(discovery, scrape_interval))
    return [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=60d"]
