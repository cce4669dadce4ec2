"""Campaign metrics as time series (through Prometheus; the Ray dashboard's Metrics view also wants Grafana).

Exported with ray.util.metrics from the driver, which lives as long as the campaign: Ray drops a
Gauge's series when the process that set it exits, so gauges must not come from short-lived tasks.
Names as Prometheus sees them (Ray prefixes `ray_`, counters get `_total`), all tagged `campaign`:

    ray_longtail_runs_done_total, ray_longtail_runs_failed_total, ray_longtail_runs_retried_total,
    ray_longtail_runs_in_flight, ray_longtail_runs_per_second, ray_longtail_progress (0..1),
    ray_longtail_share_at_target_se (adaptive stopping, when [estimates] target_se is set)

`longtail monitor` (cluster/monitor.py) charts them in Prometheus; cluster/grafana-dashboard.json
in Grafana; docs/usage.md says how to see them. tests/test_dashboard.py checks that the values
Prometheus scrapes are the campaign directory's.
"""

from __future__ import annotations


class CampaignMetrics:
    def __init__(self, campaign: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("campaign",)
        self.tags = {"campaign": campaign}
        self.done = Counter("longtail_runs_done", description="runs trained and folded", tag_keys=tags)
        self.failed = Counter("longtail_runs_failed", description="runs recorded as failed", tag_keys=tags)
        self.retried = Counter("longtail_runs_retried", description="runs retried after their worker died",
                               tag_keys=tags)
        self.in_flight = Gauge("longtail_runs_in_flight", description="runs dispatched, not finished",
                               tag_keys=tags)
        self.rate = Gauge("longtail_runs_per_second", description="runs per second in this session", tag_keys=tags)
        self.progress = Gauge("longtail_progress", description="share of planned runs done", tag_keys=tags)
        self.share = Gauge("longtail_share_at_target_se",
                           description="share of memorization estimates at [estimates] target_se", tag_keys=tags)
        self._counted = {"done": 0, "failed": 0, "retried": 0}

    def update(self, done: int, failed: int, retried: int, in_flight: int, rate: float, progress: float,
               share: float | None) -> None:
        """Set the gauges and advance the counters to the given session totals."""
        for name, total in (("done", done), ("failed", failed), ("retried", retried)):
            step = total - self._counted[name]
            if step > 0:
                getattr(self, name).inc(step, tags=self.tags)
                self._counted[name] = total
        self.in_flight.set(in_flight, tags=self.tags)
        self.rate.set(rate, tags=self.tags)
        self.progress.set(progress, tags=self.tags)
        if share is not None:
            self.share.set(share, tags=self.tags)
