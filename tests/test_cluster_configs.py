"""The files under cluster/ are checked offline, with Ray's own code where Ray has it.

Launcher YAMLs go through the part of `ray up` that needs no cloud: `prepare_config` (merge with the
provider's defaults.yaml, as `ray up` does) and `validate_config` (Ray's JSON schema and cross-key
rules). Start commands are parsed by the `ray start` command itself, so a misspelt flag fails here,
not on a GPU node. Both are private Ray APIs: the project pins Ray to 2.60.x.

The project's security rule: the dashboard and job API are protected by Ray's token alone, so they
listen on loopback and are reached through SSH. The single exception is the KubeRay head, whose
dashboard the operator must reach through the head Service; there the test insists on the other
protections instead (token auth, a ClusterIP service, no ingress).
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]
METRICS = [
    "ray_longtail_runs_done_total",
    "ray_longtail_runs_failed_total",
    "ray_longtail_runs_retried_total",
    "ray_longtail_runs_in_flight",
    "ray_longtail_runs_per_second",
    "ray_longtail_progress",
    "ray_longtail_share_at_target_se",
]
LOOPBACK = {"127.0.0.1", "localhost"}


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def prepared(name: str) -> dict:
    """The config as `ray up` sees it after merging the provider defaults, validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)
    return config


def ray_start_calls(commands: list[str]) -> list[tuple[dict, dict]]:
    """Every `ray start` in a list of shell commands: (environment assignments, parsed options)."""
    from ray.scripts.scripts import start

    calls = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            at = [i for i in range(1, len(words)) if words[i] == "start" and words[i - 1].endswith("ray")]
            if not at:
                continue
            i = at[0]
            env = dict(w.split("=", 1) for w in words[: i - 1] if "=" in w and not w.startswith("-"))
            ctx = start.make_context("start", words[i + 1:])  # raises on an unknown or malformed flag
            calls.append((env, ctx.params))
    return calls


# --- (a, b) Ray's validator ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validator(name):
    config = prepared(name)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("breakage", [
    pytest.param(lambda c: c.update(max_workers="two"), id="max_workers-not-an-integer"),
    pytest.param(lambda c: c.update(dashboard_host="0.0.0.0"), id="unknown-top-level-key"),
    pytest.param(lambda c: c.update(head_node_type="no-such-type"), id="head-type-not-declared"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), id="min-above-max"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
                 id="fractional-node-resource"),
])
def test_broken_launcher_config_is_rejected(breakage):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(load("aws-gpu.yaml"))
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, TypeError, ValueError)):
        validate_config(prepare_config(config))


# --- start commands -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_start_commands_are_valid_ray_start_calls_with_token_auth(name):
    config = prepared(name)
    heads = ray_start_calls(config["head_start_ray_commands"])
    workers = ray_start_calls(config["worker_start_ray_commands"])
    assert len(heads) == 1 and len(workers) == 1, "one `ray start` each for the head and the workers"
    (_, head), (_, worker) = heads[0], workers[0]
    assert head["head"] and head["port"] == 6379
    assert worker["address"] == "$RAY_HEAD_IP:6379"
    for env, params in (heads[0], workers[0]):
        # Clients of a token cluster need the mode set explicitly (ray.md 2b); the head fails closed.
        assert env.get("RAY_AUTH_MODE") == "token"
        assert env.get("RAY_USAGE_STATS_ENABLED") == "0"
        assert params["metrics_export_port"] == 8080, "cluster/prometheus.yml and the docs assume 8080"
    # `ray start` refuses token mode without a token: every node gets the same one from your machine.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_head_node_does_not_train(name):
    config = prepared(name)
    head_type = config["available_node_types"][config["head_node_type"]]
    if config["provider"]["type"] == "local":
        # The local provider has one node type for all hosts; the head is set in its start command.
        (_, head), = ray_start_calls(config["head_start_ray_commands"])
        assert head["num_cpus"] == 0 and head["num_gpus"] == 0
    else:
        assert head_type["resources"] == {"CPU": 0}
        workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
        assert all(t["min_workers"] == t["max_workers"] for t in workers), "fixed-size GPU pool"


# --- (f) the dashboard stays on loopback --------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_dashboard_is_bound_to_loopback(name):
    config = prepared(name)  # defaults merged: a key left out must not bring back 0.0.0.0
    (_, head), = ray_start_calls(config["head_start_ray_commands"])
    assert head["dashboard_host"] in LOOPBACK
    every_command = json.dumps({k: v for k, v in config.items() if k.endswith("commands")})
    assert "0.0.0.0" not in every_command


def test_no_config_binds_the_dashboard_to_all_interfaces_except_the_kuberay_head():
    for path in sorted(CLUSTER.glob("*.y*ml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "dashboard" in code and "0.0.0.0" in code and path.name != "rayjob.yaml":
                pytest.fail(f"{path.name}:{n} binds the dashboard to all interfaces: {line.strip()}")
    # KubeRay: the operator and submitter reach the job API through the head Service (the pod IP),
    # so loopback would break the RayJob. What must hold instead:
    cluster = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") in LOOPBACK | {"0.0.0.0"}
    assert cluster["authOptions"]["mode"] == "token"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


# --- (c) the RayJob -----------------------------------------------------------------------------

def _mounts(pod_spec: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there, for the pod's first container."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in pod_spec["containers"][0].get("volumeMounts", [])}


def test_rayjob_runs_longtail_on_a_shared_campaign_volume():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["longtail", "run", "/specs/campaign.toml"]
    out = words[words.index("--out") + 1]
    assert out.startswith("/campaigns/")
    # As a job's driver it joins the job's cluster (RAY_ADDRESS); any other address would be wrong.
    assert "--address" not in words or words[words.index("--address") + 1] == "auto"
    assert spec["shutdownAfterJobFinishes"] is False
    assert spec["submitterConfig"]["backoffLimit"] == 0 and spec["backoffLimit"] == 0

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_mounts = _mounts(head["template"]["spec"])
    assert "configMap" in head_mounts["/specs"]
    claim = head_mounts["/campaigns"]["persistentVolumeClaim"]["claimName"]

    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        mounts = _mounts(pod)
        # Workers write the shards the driver reads: the same claim on every pod.
        assert mounts["/campaigns"]["persistentVolumeClaim"]["claimName"] == claim
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    assert head_mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"


# --- (d, e) metrics -----------------------------------------------------------------------------

def test_grafana_dashboard_shows_every_longtail_metric_by_campaign():
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "campaign" in json.dumps(variables["campaign"]["query"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for metric in METRICS:
        assert any(metric in e for e in exprs), f"no panel shows {metric}"
    for e in exprs:
        assert 'campaign=~"$campaign"' in e, f"panel query ignores the campaign variable: {e}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all({"x", "y", "w", "h"} <= set(p["gridPos"]) for p in dashboard["panels"])


def test_prometheus_reads_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = load("prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert files and all(Path(f).name == PROMETHEUS_SERVICE_DISCOVERY_FILE for f in files)
