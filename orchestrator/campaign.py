"""A campaign directory: created from a spec, or reopened and checked against one.

campaign.toml is written last when a campaign is created, so a directory that has it holds a
complete plan. Reopening compares every result-changing key of the new spec with the frozen one and
refuses on any difference; keys that only change how the work is done ([resources], [estimates],
a larger [campaign] runs) are taken from the new spec and the frozen file is updated.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import LongtailError
from workers.datasets import Dataset, dataset_fingerprint, load_dataset
from workers.storage import arrow_source, atomic_path, atomic_write_text, is_temporary, open_input, TMP_MARKER
from workers.worker import preflight

from orchestrator import plan as planning
from orchestrator import spec as specs
from orchestrator.paths import CampaignPaths, is_probe


class CampaignError(LongtailError, RuntimeError):
    """A campaign directory that cannot be used as asked; the message says why and what to run."""


class SpecMismatchError(CampaignError):
    pass


def write_examples(path: Path, data: Dataset, fingerprint: str) -> None:
    """plan/examples.parquet: split, example, label (and group) of every example, so that estimates
    can be labelled and filtered by class without the dataset."""
    with atomic_path(path) as tmp:
        pq.write_table(examples_table(data, fingerprint), tmp, compression="zstd")


def examples_table(data: Dataset, fingerprint: str) -> pa.Table:
    n_tr, n_te = data.n_train, data.n_test
    cols = {
        "split": pa.array(["train"] * n_tr + ["test"] * n_te).dictionary_encode(),
        "example": pa.array(np.r_[np.arange(n_tr), np.arange(n_te)].astype(np.int32)),
        "label": pa.array(np.r_[data.y_train, data.y_test].astype(np.int32)),
    }
    if data.train_groups is not None and data.test_groups is not None:
        cols["group"] = pa.array(np.r_[data.train_groups, data.test_groups].astype(np.int32))
    meta = {"fingerprint": fingerprint, "dataset": data.name, "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "info": data.info}
    return pa.table(cols).replace_schema_metadata({b"longtail": json.dumps(meta).encode()})


def read_examples(path) -> tuple[dict, dict[str, np.ndarray]]:
    source, filesystem = arrow_source(path)
    try:
        table = pq.read_table(source, filesystem=filesystem)
        meta = json.loads(table.schema.metadata[b"longtail"])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise CampaignError(f"{path}: unreadable ({type(e).__name__}), expected the campaign's example table; "
                            f"delete it and `longtail resume` rebuilds it from the dataset") from None
    split = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    out = {}
    for name in ("train", "test"):
        sel = split == name
        order = np.argsort(table.column("example").to_numpy()[sel])
        out[f"{name}_labels"] = table.column("label").to_numpy()[sel][order].astype(np.int64)
        if "group" in table.column_names:
            out[f"{name}_groups"] = table.column("group").to_numpy()[sel][order].astype(np.int64)
    return meta, out


@dataclass
class Campaign:
    paths: CampaignPaths
    spec: specs.Spec
    plan: planning.Plan
    dataset: Dataset | None  # None when opened without loading the data (estimate, status)
    labels: dict[str, np.ndarray]  # train_labels, test_labels (and groups) from plan/examples.parquet
    fingerprint: str  # of the dataset, see workers.datasets.dataset_fingerprint
    notes: list[str]  # what opening changed, for the user

    @property
    def name(self) -> str:
        return self.spec.campaign.name

    @property
    def n_train(self) -> int:
        return self.plan.n_train

    @property
    def n_test(self) -> int:
        return len(self.labels["test_labels"])

    def finished_runs(self) -> set[int]:
        """Runs whose shard exists under its final name (the definition of done)."""
        done = set()
        if self.paths.runs_dir.exists():
            for entry in self.paths.runs_dir.iterdir():
                r = self.paths.run_of_shard(entry.name)
                if r is not None and r < self.plan.runs:
                    done.add(r)
        return done

    def failed_runs(self) -> set[int]:
        failed = set()
        if self.paths.failed_dir.exists():
            for entry in self.paths.failed_dir.iterdir():
                run = self.paths.run_of_failure(entry.name)
                if run is not None:
                    failed.add(run)
        return failed

    def failure_reasons(self) -> dict[str, int]:
        """How many recorded failures share each reason. Reasons that differ only in their numbers ("seed 12
        is odd", "seed 31 is odd") count as one, shown with the numbers of its first run (the values are what
        the user needs to see) and "(numbers vary; shown: run N)" when they differ."""
        groups: dict[str, list] = {}
        for run in sorted(self.failed_runs()):
            try:
                reason = json.loads(self.paths.failure(run).read_text()).get("reason", "unknown")
            except (OSError, ValueError, AttributeError):
                reason = "unreadable failure record"
            groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", reason), []).append((run, reason[:160]))
        shown = {}
        for g in groups.values():
            first_run, first = g[0]
            varies = len({reason for _, reason in g}) > 1
            shown[f"{first} (numbers vary; shown: run {first_run})" if varies else first] = len(g)
        return dict(sorted(shown.items(), key=lambda kv: -kv[1]))

    def sweep_temporaries(self) -> list:
        """Remove files a crashed writer left behind under temporary names; return what was removed."""
        removed = []
        for d in (self.paths.runs_dir, self.paths.state_dir, self.paths.estimates_dir, self.paths.plan_dir,
                  self.paths.root):
            if d.exists():
                for entry in d.iterdir():
                    if (is_temporary(entry.name) or is_probe(entry.name)) and entry.is_file():
                        entry.unlink(missing_ok=True)
                        removed.append(entry)
        return removed

    def sweep_run_temporaries(self, runs) -> list:
        """Remove the temporary shards of `runs` (a worker that died while writing leaves one); call it
        only when none of them is being written, i.e. before they are dispatched again."""
        names = {f".{self.paths.shard(r).name}" for r in runs}
        removed = []
        if self.paths.runs_dir.exists():
            for entry in self.paths.runs_dir.iterdir():
                if is_temporary(entry.name) and entry.name.split(TMP_MARKER)[0] in names and entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
        return removed


def _check_spec(frozen: specs.Spec, new: specs.Spec, paths: CampaignPaths) -> None:
    diffs = specs.differences(frozen, new)
    if diffs:
        lines = "\n".join(f"  {k}: {a!r} in {paths.spec}, {b!r} in the new spec" for k, a, b in diffs)
        raise SpecMismatchError(
            f"the spec changes results of the existing campaign in {paths.root}:\n{lines}\n"
            f"Resume with the frozen spec (longtail resume {paths.root}), or start a new campaign with "
            f"--out pointing to another directory.")
    if new.campaign.runs < frozen.campaign.runs:
        raise SpecMismatchError(
            f"[campaign] runs: {frozen.campaign.runs} in {paths.spec}, {new.campaign.runs} in the new spec; "
            f"a campaign can grow but not shrink (its estimates may already include those runs)")


def _results_of(spec: specs.Spec) -> dict:
    return json.loads(json.dumps(spec.result_keys(), sort_keys=True, default=str))


def _write_results_record(paths: CampaignPaths, spec: specs.Spec) -> None:
    atomic_write_text(paths.results_record, json.dumps(
        {"result_hash": spec.result_hash(), "result_keys": _results_of(spec)}, indent=2, sort_keys=True) + "\n")


def _check_frozen(frozen: specs.Spec, paths: CampaignPaths) -> None:
    """Refuse a campaign.toml edited by hand in a key that changes results: its shards and fold were made
    with the values recorded at creation, and trusting the edit would throw them all away."""
    record = paths.results_record
    if record.exists():
        try:
            created = json.loads(record.read_text())["result_keys"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # an unreadable record proves nothing; the shards' own spec hash still guards them
        now = _results_of(frozen)
        diffs = [(k, created.get(k), now.get(k)) for k in sorted(set(created) | set(now)) if created.get(k) != now.get(k)]
    elif paths.checkpoint.exists():  # a campaign made before the record existed: the fold's spec hash
        try:
            with open_input(paths.checkpoint) as f, np.load(f, allow_pickle=False) as z:
                stamped = str(z["spec_hash"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return
        if stamped == frozen.result_hash():
            return
        raise SpecMismatchError(
            f"{paths.spec} was changed by hand in a key that changes results: its results hash is "
            f"{frozen.result_hash()}, the fold in {paths.checkpoint} was made with {stamped}. Undo the edit to "
            f"continue this campaign, or start a new one from the edited spec: longtail run SPEC --out OTHER_DIR")
    else:
        return
    if diffs:
        keys = "; ".join(f"{k} = {_toml(a)} when the campaign was created, {_toml(b)} now" for k, a, b in diffs)
        restore = ", ".join(f"{k} = {_toml(a)}" for k, a, _ in diffs)
        raise SpecMismatchError(
            f"{paths.spec} was changed by hand in keys that change results ({keys}); its shards were made with "
            f"the old values (recorded in {record}). To continue the campaign restore {restore} in {paths.spec}; "
            f"to use the new values start a new campaign from the edited spec: longtail run SPEC --out OTHER_DIR")


def _toml(value) -> str:
    return "(absent)" if value is None else json.dumps(value)


def _read_or_rebuild_plan(paths: CampaignPaths, spec: specs.Spec, n_train: int, notes: list[str],
                          rebuild: bool) -> planning.Plan:
    """The plan in plan/; where its files are missing (not modified: that is refused), it is a pure function
    of the frozen spec and is rebuilt by run and resume, never by readers such as status."""
    missing = [p for p in (paths.plan_info, paths.plan_masks, paths.plan_seeds, paths.plan_ratios) if not p.exists()]
    if not missing:
        return planning.read_plan(paths)
    what = ", ".join(str(p) for p in missing)
    if not rebuild:
        raise CampaignError(f"{what}: missing, expected the campaign's plan; it is a function of {paths.spec}: "
                            f"`longtail resume {paths.root}` rebuilds it")
    c = spec.campaign
    plan = planning.make_plan(c.design, c.seed, n_train, c.ratios, c.runs)
    planning.write_plan(paths, plan)
    notes.append(f"rebuilt the missing plan files ({what}) from {paths.spec}")
    return plan


def _interrupted_creation(paths: CampaignPaths) -> bool:
    """Whether `paths.root` holds only what creating a campaign writes before its campaign.toml (written
    last): a creating command was killed. Nothing of value is in it yet (no shard, no fold), so creation
    may start again; anything else in the directory (a user's file, a shard) keeps it refused."""
    made = {d.name for d in paths.created_dirs}
    files = {f.name for f in paths.created_files}
    for entry in paths.root.iterdir():
        if is_temporary(entry.name):
            continue
        if entry.name not in made or not entry.is_dir():
            return False
        for inner in entry.iterdir():
            ours = entry.name == paths.plan_dir.name and inner.name in files and inner.is_file()
            if not (ours or is_temporary(inner.name)):
                return False
    return True


def create_or_open(spec: specs.Spec | None, root, load_data: bool = True) -> Campaign:
    """Create the campaign in `root` from `spec`, or reopen it (spec=None: use the frozen one)."""
    paths = CampaignPaths(root)
    notes: list[str] = []
    if paths.root.exists() and not paths.root.is_dir():
        raise CampaignError(f"{paths.root} is a file, expected a campaign directory (or a path that does not exist "
                            f"yet); give another --out directory")
    if paths.spec.exists():
        frozen = specs.loads(paths.spec.read_text(), str(paths.spec))
        _check_frozen(frozen, paths)
        if spec is None:
            spec = frozen
        else:
            _check_spec(frozen, spec, paths)
            changed = [k for k in sorted(set(frozen.to_dict()) | set(spec.to_dict()))
                       if frozen.to_dict().get(k) != spec.to_dict().get(k)]
            if changed:
                notes.append(f"updated {', '.join('[' + c + ']' for c in changed)} in {paths.spec}")
        dataset = load_dataset(spec.dataset.as_dict()) if load_data else None
        if dataset is not None:
            preflight(spec.to_dict(), dataset)
        if not paths.examples.exists():
            if dataset is None:
                raise CampaignError(f"{paths.examples} is missing, expected the campaign's example table; it is a "
                                    f"function of the dataset: `longtail resume {paths.root}` rebuilds it")
            write_examples(paths.examples, dataset, dataset_fingerprint(dataset))
            notes.append(f"rebuilt the missing {paths.examples} from the dataset")
        meta, labels = read_examples(paths.examples)
        if dataset is not None and dataset_fingerprint(dataset) != meta["fingerprint"]:
            raise CampaignError(f"the dataset {spec.dataset.name!r} differs from the one this campaign was "
                                f"created with (fingerprint {dataset_fingerprint(dataset)} vs {meta['fingerprint']} "
                                f"in {paths.examples}); its estimates would mix two datasets")
        plan = _read_or_rebuild_plan(paths, frozen, len(labels["train_labels"]), notes, rebuild=dataset is not None)
        c = spec.campaign
        if (plan.design, plan.campaign_seed, plan.ratios) != (c.design, c.seed, c.ratios):
            raise CampaignError(f"the plan in {paths.plan_dir} does not match {paths.spec} (design, seed or subset "
                                f"ratios differ); the campaign directory was modified by hand")
        if spec.campaign.runs > plan.runs:
            plan = planning.extend_plan(plan, spec.campaign.runs)
            planning.write_plan(paths, plan)
            notes.append(f"extended the plan from {frozen.campaign.runs} to {spec.campaign.runs} runs")
        if spec.to_dict() != frozen.to_dict():
            atomic_write_text(paths.spec, specs.dumps(spec))
        return Campaign(paths, spec, plan, dataset, labels, meta["fingerprint"], notes)

    if spec is None:
        raise CampaignError(f"{paths.root} is not a campaign directory (no {paths.spec.name}); "
                            f"start one with: longtail run SPEC --out {paths.root}")
    if paths.root.exists() and _interrupted_creation(paths):
        # its files were written atomically, so they are whole and are written again below; only the
        # killed writer's temporaries go
        for d in (paths.root, *(d for d in paths.created_dirs if d.exists())):
            for f in d.iterdir():
                if is_temporary(f.name) and f.is_file():
                    f.unlink(missing_ok=True)
        notes.append(f"{paths.root} held a campaign whose creation was interrupted (no {paths.spec.name} yet, no "
                     f"shard): created it again")
    elif paths.root.exists() and any(p for p in paths.root.iterdir() if not is_temporary(p.name)):
        raise CampaignError(f"{paths.root} exists, is not empty and holds no {paths.spec.name}; refusing to write "
                            f"a campaign into it. Choose another --out directory.")
    dataset = load_dataset(spec.dataset.as_dict())
    preflight(spec.to_dict(), dataset)  # everything is checked before anything is written
    fingerprint = dataset_fingerprint(dataset)
    plan = planning.make_plan(spec.campaign.design, spec.campaign.seed, dataset.n_train, spec.campaign.ratios,
                              spec.campaign.runs)
    paths.make_dirs()
    write_examples(paths.examples, dataset, fingerprint)
    planning.write_plan(paths, plan)
    _write_results_record(paths, spec)
    atomic_write_text(paths.spec, specs.dumps(spec))  # last: its presence means the campaign is complete
    labels = {"train_labels": dataset.y_train, "test_labels": dataset.y_test}
    if dataset.train_groups is not None:
        labels.update(train_groups=np.asarray(dataset.train_groups), test_groups=np.asarray(dataset.test_groups))
    notes.append(f"created campaign {spec.campaign.name!r} in {paths.root}")
    return Campaign(paths, spec, plan, dataset if load_data else None, labels, fingerprint, notes)
