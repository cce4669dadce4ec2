"""The campaign spec: one TOML file, validated, resolved (defaults filled in) and frozen.

Every section is a dataclass whose fields carry their documentation and their valid range, so that
the error for a bad value, the list of valid keys and docs/spec.md all come from one place.
[dataset] and [model] name a built-in (with its own option dataclass) or a plug-in given as
"package.module:function", whose options are passed through unvalidated. The declarations and their
parser are workers/options.py's, and [train]'s keys are workers/train_options.py's: the workers own
what they consume, and this module adds the spec's sections, cross-checks, error class and hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import options
from workers.datasets import DATASET_OPTIONS
from workers.errors import LongtailError
from workers.models import MODEL_OPTIONS
# describe_keys, REQUIRED and _toml_value are imported from here by callers (tests, benchmarks)
from workers.options import REQUIRED, describe_keys, option, type_name  # noqa: F401
from workers.options import default_of as _default
from workers.options import nonnegative as _nonnegative
from workers.options import positive as _positive
from workers.options import toml_value as _toml_value
from workers.train_options import TrainOptions, warmup_problem

from orchestrator.plan import DESIGNS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SpecError(LongtailError, ValueError):
    """A campaign spec that cannot be used; the message says where, what was expected and what was found."""


# store entries that add columns without changing any run's predictions: left out of the spec hash, so
# that turning them on or off keeps a campaign resumable (the dynamics are read off the training batches)
UNHASHED_STORE = ("dynamics",)
SOFT_TARGETS = ("margin", "probability")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CampaignSection:
    name: str = option(REQUIRED, "campaign name: letters, digits, '.', '_', '-' (used in paths and Ray names)",
                       lambda v: bool(NAME_RE.match(v)), "1-64 characters from [A-Za-z0-9._-]")
    seed: int = option(0, "campaign seed: run r's subset and training seed derive from (seed, r)", _nonnegative,
                       "an integer >= 0")
    runs: int = option(REQUIRED, "number of runs t (models trained), each on a random subset",
                       lambda v: v >= 2, "an integer >= 2", affects_results=False)
    subset_ratio: float | list[float] = option(
        0.7, "share of the training set each run trains on (the paper uses 0.7); a list of ratios (e.g. "
        "[0.1, 0.3, 0.5, 0.7, 0.9]) spreads the runs over them, for the C-score",
        lambda v: all(0 < r < 1 for r in _ratios(v)) and len(set(_ratios(v))) == len(_ratios(v)) <= 100,
        "a number strictly between 0 and 1, or a list of up to 100 distinct such numbers")
    design: str = option("fixed", "how subsets are drawn: 'fixed' (exactly round(ratio * n) examples, the paper's), "
                         "'bernoulli' (each example with probability ratio), 'balanced' (each example in exactly "
                         "round(ratio * runs) runs), 'paired' (run 2k+1 trains on the complement of run 2k)",
                         lambda v: v in DESIGNS, "one of: " + ", ".join(DESIGNS))

    @property
    def ratios(self) -> tuple[float, ...]:
        return _ratios(self.subset_ratio)


def _ratios(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, list) else (float(value),)


@dataclass(frozen=True)
class TrainSection(TrainOptions):
    """[train]: the workers' TrainOptions (workers/train_options.py declares every key and default once),
    with the check that needs two keys at once."""

    def __post_init__(self):
        problem = warmup_problem(self.warmup_epochs, self.epochs)
        if problem:
            raise SpecError(f"[train]: {problem}")


@dataclass(frozen=True)
class ResourcesSection:
    workers: int = option(0, "long-lived worker actors; 0 = as many as the cluster's resources fit",
                          _nonnegative, "an integer >= 0", affects_results=False)
    cpus_per_worker: float = option(1.0, "CPUs per worker (also its torch intra-op threads)", _positive,
                                    "a number > 0", affects_results=False)
    gpus_per_worker: float = option(0.0, "GPUs per worker; fractions pack several workers on one GPU",
                                    _nonnegative, "a number >= 0", affects_results=False)
    max_in_flight: int = option(0, "runs dispatched and not yet finished; 0 = two calls per worker", _nonnegative,
                                "an integer >= 0", affects_results=False)
    devices_per_run: int = option(1, "devices one run trains on: above 1, each run trains data-parallel "
                                  "(DDP) through Ray Train on that many workers of cpus_per_worker CPUs and "
                                  "gpus_per_worker GPUs each (use gpus_per_worker = 1 for one GPU each)",
                                  _positive, "an integer >= 1", affects_results=False)
    pack: int = option(0, "runs per worker call, trained together in one vectorized step where the model allows "
                       "(the builtin mlp; the builtin convnets cnn and airbench, one fused model per call); 0 = 16 "
                       "for the builtin mlp, 8 for cnn and airbench on GPU workers, 1 otherwise", _nonnegative,
                       "an integer >= 0",
                       affects_results=False)
    max_retries: int = option(3, "times a run is retried on another worker after its worker process or node died",
                              _nonnegative, "an integer >= 0", affects_results=False)
    max_failures: float = option(0.1, "failure budget: the campaign stops when more runs fail in one session; "
                                 "below 1 a share of the planned runs, from 1 a number of runs", _positive,
                                 "a number > 0", affects_results=False)
    ship_shards: str = option("auto", "how shards reach the campaign directory: 'auto' (workers write them where "
                              "they can see the directory, others send them to the driver through Ray's object "
                              "store) or 'driver' (always through the driver)", lambda v: v in ("auto", "driver"),
                              "'auto' or 'driver'", affects_results=False)
    local_cpus: int = option(0, "CPUs of the embedded local Ray (ignored with --address); 0 = all of this machine",
                             _nonnegative, "an integer >= 0", affects_results=False)
    fold_actors: int = option(0, "fold actors on the cluster (one CPU each) that read, verify and fold the "
                              "campaign's shards as they arrive, merged into the driver's fold at every "
                              "checkpoint; 0 = the driver folds every shard itself", _nonnegative,
                              "an integer >= 0", affects_results=False)


INFLUENCE_MODES = ("auto", "dense", "per-class", "topk", "none")


@dataclass(frozen=True)
class EstimatesSection:
    influence: str = option("auto", "influence output: 'dense' (n_train x n_test matrix), 'per-class' (same-class "
                            "blocks, the paper's CIFAR-100 layout), 'topk' (top_k influencers of every test example "
                            "and every pair above infl_threshold), 'none', or 'auto' (dense if it fits memory_gb, "
                            "else topk)", lambda v: v in INFLUENCE_MODES, "one of: " + ", ".join(INFLUENCE_MODES),
                            affects_results=False)
    memory_gb: float = option(2.0, "memory for influence: the dense matrices in 'auto', the tiles otherwise",
                              _positive, "a number > 0", affects_results=False)
    top_k: int = option(10, "influencers kept per test example in 'topk' mode", _positive, "an integer > 0",
                        affects_results=False)
    soft: list[str] = option([], "soft estimates computed beside the 0/1 ones, from values [train] store keeps: "
                             "'margin' and/or 'probability'", lambda v: set(v) <= set(SOFT_TARGETS) and
                             len(set(v)) == len(v), "a list of distinct values from: " + ", ".join(SOFT_TARGETS),
                             affects_results=False)
    ratio: float = option(0.0, "the subset ratio whose runs give memorization and influence; 0 = the first of "
                          "[campaign] subset_ratio (the others feed the C-score)", lambda v: 0 <= v < 1,
                          "0 or one of [campaign] subset_ratio", affects_results=False)
    split_half: bool = option(True, "estimate again from even and from odd runs and report their agreement",
                              affects_results=False)
    min_accuracy: float = option(0.5, "a run whose test accuracy is below min_accuracy x the median of the "
                                 "campaign's runs is recorded as failed, never folded (the first runs are "
                                 "held until 10 accuracies are known); 0 = off",
                                 lambda v: 0 <= v < 1, "a number in [0, 1)", affects_results=False)
    target_se: float = option(0.0, "adaptive stopping: stop scheduling runs once target_share of the memorization "
                              "estimates have a standard error <= target_se; 0 = run every planned run",
                              _nonnegative, "a number >= 0", affects_results=False)
    target_share: float = option(0.95, "adaptive stopping: share of estimates that must reach target_se",
                                 lambda v: 0 < v <= 1, "a number in (0, 1]", affects_results=False)
    mem_threshold: float = option(0.25, "high-influence pairs: minimum memorization of the training example",
                                  affects_results=False)
    infl_threshold: float = option(0.15, "high-influence pairs: minimum influence", affects_results=False)
    same_class: bool = option(True, "high-influence pairs: only pairs whose labels agree", affects_results=False)
    block_runs: int = option(256, "runs folded per GEMM block", _positive, "an integer > 0",
                             affects_results=False)
    checkpoint_seconds: float = option(30.0, "seconds between checkpoints of the fold and estimates/",
                                       _positive, "a number > 0", affects_results=False)
    # triage of memorized examples by their out-of-subset predictions (docs/proxies-and-triage.md)
    triage_mem: float = option(0.25, "triage: examples with memorization >= triage_mem are triaged", lambda v: 0 < v <= 1,
                               "a number in (0, 1]", affects_results=False)
    triage_agree: float = option(0.5, "triage: 'mislabeled' when the out-of-subset models' most predicted class is "
                                 "not the label and holds at least this share of their predictions",
                                 lambda v: 0 < v <= 1, "a number in (0, 1]", affects_results=False)
    triage_split: float = option(0.2, "triage: 'ambiguous' (if not mislabeled) when the label and the best other class "
                                 "each hold at least this share and all other classes together at most this share", lambda v: 0 < v <= 0.5, "a number in (0, 0.5]",
                                 affects_results=False)
    triage_slots: int = option(8, "out-of-subset predictions: (class, count) pairs kept per example when a dense "
                               "examples x classes table does not fit a quarter of memory_gb (a Misra-Gries summary "
                               "with a stated error bound)", _positive, "an integer > 0", affects_results=False)


SECTIONS: dict[str, type] = {
    "campaign": CampaignSection,
    "dataset": None,  # type: ignore[dict-item]  # plug-in sections, see PluginSection
    "model": None,  # type: ignore[dict-item]
    "train": TrainSection,
    "resources": ResourcesSection,
    "estimates": EstimatesSection,
}


@dataclass(frozen=True)
class PluginSection:
    """[dataset] or [model]: a built-in chosen by name, or 'package.module:function'."""

    name: str
    options: dict

    @property
    def is_plugin(self) -> bool:
        return ":" in self.name

    def as_dict(self) -> dict:
        return {"name": self.name, **self.options}


@dataclass(frozen=True)
class Spec:
    campaign: CampaignSection
    dataset: PluginSection
    model: PluginSection
    train: TrainSection
    resources: ResourcesSection
    estimates: EstimatesSection

    def to_dict(self) -> dict:
        return {
            "campaign": dataclasses.asdict(self.campaign),
            "dataset": self.dataset.as_dict(),
            "model": self.model.as_dict(),
            "train": dataclasses.asdict(self.train),
            "resources": dataclasses.asdict(self.resources),
            "estimates": dataclasses.asdict(self.estimates),
        }

    def result_keys(self) -> dict[str, Any]:
        """The flattened keys that change what a run produces (dataset, model and plug-in options included;
        options a built-in marks as not changing results, such as where its files are, left out)."""
        builtin = {"dataset": DATASET_OPTIONS.get(self.dataset.name), "model": MODEL_OPTIONS.get(self.model.name)}
        flat = {}
        for section, values in self.to_dict().items():
            cls = SECTIONS[section] or builtin.get(section)
            for key, value in values.items():
                if cls is not None and key != "name":
                    f = _field(cls, key)
                    if not f.metadata["affects_results"]:
                        continue
                    if f.metadata.get("neutral_default") and value == _default(f):
                        continue
                if section == "train" and key == "store":
                    value = [v for v in value if v not in UNHASHED_STORE]
                flat[f"{section}.{key}"] = value
        return flat

    @property
    def primary_ratio(self) -> float:
        """The subset ratio whose runs give memorization and influence."""
        return self.estimates.ratio or self.campaign.ratios[0]

    def result_hash(self) -> str:
        """A short hash of everything that changes a run's output; stamped into every shard."""
        blob = json.dumps(self.result_keys(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **sections) -> "Spec":
        return dataclasses.replace(self, **sections)


def _field(cls, key: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[key]


def parse_section(cls, raw: dict, where: str):
    """Build section dataclass `cls` from the TOML table `raw`; `where` names it in errors ("[train] in x.toml")."""
    return options.parse_section(cls, raw, where, error=SpecError)


def _parse_plugin(raw, where: str, registry: dict[str, type]) -> PluginSection:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a table, found {raw!r}")
    if "name" not in raw:
        raise SpecError(f"{where}: missing required key 'name'; expected one of "
                        f"{', '.join(sorted(registry))} or 'package.module:function'")
    name = raw["name"]
    if not isinstance(name, str):
        raise SpecError(f"{where}: key 'name' must be a string, found {name!r}")
    rest = {k: v for k, v in raw.items() if k != "name"}
    if ":" in name:
        module, _, func = name.partition(":")
        if not module or not func or not all(p.isidentifier() for p in module.split(".")) or not func.isidentifier():
            raise SpecError(f"{where}: name {name!r} is not an import path; expected 'package.module:function'")
        return PluginSection(name=name, options=rest)
    if name not in registry:
        raise SpecError(f"{where}: unknown name {name!r}; expected one of {', '.join(sorted(registry))} "
                        f"or a plug-in 'package.module:function'")
    opts = parse_section(registry[name], rest, f"{where} (name = {name!r})")
    return PluginSection(name=name, options=dataclasses.asdict(opts))


def _cross_check(spec: Spec, source: str) -> Spec:
    e, c = spec.estimates, spec.campaign
    missing = sorted(set(e.soft) - set(spec.train.store))
    if missing:
        raise SpecError(f"[estimates] in {source}: soft = {e.soft} needs {missing} in [train] store "
                        f"(now {spec.train.store}); the shards must keep the values the soft estimates use")
    if e.ratio and e.ratio not in c.ratios:
        raise SpecError(f"[estimates] in {source}: ratio = {e.ratio} is not one of [campaign] subset_ratio "
                        f"{list(c.ratios)}; expected 0 (the first) or one of them")
    return spec


def from_dict(raw: dict, source: str = "<spec>") -> Spec:
    """Validate and resolve a spec given as nested dicts (as tomllib returns them)."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SpecError(f"{source}: unknown section(s) {', '.join('[' + u + ']' for u in unknown)}; "
                        f"valid sections: {', '.join('[' + s + ']' for s in SECTIONS)}")
    if "model" not in raw and isinstance(raw.get("train"), dict) and raw["train"].get("trainer"):
        raw = {**raw, "model": {"name": "mlp"}}  # not used with a trainer plug-in (docs/plugins.md)
    for required in ("campaign", "dataset", "model"):
        if required not in raw:
            raise SpecError(f"{source}: missing section [{required}]"
                            + ("; [model] may be left out only when [train] trainer is set" if required == "model" else ""))
    return _cross_check(Spec(
        campaign=parse_section(CampaignSection, raw["campaign"], f"[campaign] in {source}"),
        dataset=_parse_plugin(raw["dataset"], f"[dataset] in {source}", DATASET_OPTIONS),
        model=_parse_plugin(raw["model"], f"[model] in {source}", MODEL_OPTIONS),
        train=parse_section(TrainSection, raw.get("train", {}), f"[train] in {source}"),
        resources=parse_section(ResourcesSection, raw.get("resources", {}), f"[resources] in {source}"),
        estimates=parse_section(EstimatesSection, raw.get("estimates", {}), f"[estimates] in {source}"),
    ), source)


def loads(text: str, source: str = "<spec>") -> Spec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None
    return from_dict(raw, source)


def load(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
    return loads(text, str(path))


def dumps(spec: Spec) -> str:
    """The resolved spec as TOML; `loads(dumps(s)) == s`."""
    out = []
    for section, values in spec.to_dict().items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def differences(old: Spec, new: Spec) -> list[tuple[str, Any, Any]]:
    """Result-changing keys whose values differ: (key, old value, new value)."""
    a, b = old.result_keys(), new.result_keys()
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def reference_markdown() -> str:
    """Every key of every section and built-in, as Markdown tables (docs/spec.md embeds this output)."""
    def table(cls) -> str:
        hints = typing.get_type_hints(cls)
        rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = "(required)" if f.default is REQUIRED else _toml_value(_default(f))
            accepts = f.metadata.get("expect") or type_name(hints[f.name])
            note = "" if f.metadata.get("affects_results", True) else " *(may change on resume)*"
            rows.append(f"| `{f.name}` | `{default}` | {accepts} | {f.metadata['doc']}{note} |")
        return "\n".join(rows)

    parts = [f"### [{name}]\n\n{table(cls)}\n" for name, cls in SECTIONS.items() if cls is not None]
    parts += [f'### [dataset] name = "{name}"\n\n{table(cls)}\n' for name, cls in DATASET_OPTIONS.items()]
    parts += [f'### [model] name = "{name}"\n\n{table(cls)}\n' for name, cls in MODEL_OPTIONS.items()]
    return "\n".join(parts)
