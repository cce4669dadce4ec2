"""`longtail audit CAMPAIGN TARGET...`: membership scores of a target model from the campaign's runs used
as shadow models (the likelihood-ratio attack; numeric core in estimators/privacy.py, docs/audit.md).

A target is
- a shard of a run of this campaign: its membership is the plan's, and its own contribution is taken
  out of the fitted statistics (exactly: they are sums), so it is never scored against itself;
- a shard of another campaign on the same dataset (checked by the dataset fingerprint in that
  campaign's plan/examples.parquet): membership from its in_subset column;
- a table of a user's own model's outputs on the training examples (Parquet or CSV): `example` and
  either `statistic` (log(p / (1 - p)) of the correct class, or the margin: the campaign's kind) or
  the logits (`logits` list column, or `logit_0`, `logit_1`, ... columns); optional `member` (0/1)
  and `label` (checked against the campaign's labels).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from estimators import privacy as pv
from workers.errors import LongtailError
from workers.shard import META_KEY, read_shard

from orchestrator.fold import Aggregator
from orchestrator.campaign import Campaign, create_or_open, read_examples
from orchestrator.paths import AuditPaths, CampaignPaths

FPRS = (0.001, 0.01)
ATTACKS = ("online", "offline", "threshold")


class AuditError(LongtailError, ValueError):
    """A target that cannot be audited against this campaign; the message says why."""


@dataclass
class Target:
    name: str
    kind: str  # "run" (of this campaign), "shard" (of another campaign), "table"
    statistic: np.ndarray  # (n_train,) float64
    members: np.ndarray | None  # (n_train,) bool when membership is known
    run: int | None = None  # this campaign's run whose contribution is taken out
    mask: np.ndarray | None = None


def _shard_meta(path: Path) -> dict | None:
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    if META_KEY not in md:
        return None
    try:
        meta = json.loads(md[META_KEY])
    except ValueError:
        return None
    return meta if "run" in meta and "spec_hash" in meta else None


def _statistic_of(agg: Aggregator, values: dict, where: str) -> np.ndarray:
    source = agg.risk_source
    x = pv.statistic(values, agg.c.labels["train_labels"], source)
    if x is None:
        raise AuditError(f"{where}: holds no {source!r} values, the statistic this campaign's risk is fitted on "
                         f"(from [train] store = {agg.c.spec.train.store}); audit a target that stores them")
    if not np.isfinite(x).all():
        raise AuditError(f"{where}: the {source!r} statistic is NaN or infinite for {int((~np.isfinite(x)).sum())} "
                         f"examples (overflowing float16 values); this run cannot be scored")
    return x


def load_target(agg: Aggregator, path: str) -> Target:
    c = agg.c
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"target {path}: no such file; expected a run shard (such as {c.paths.shard(0)}) "
                         f"or a table of a model's outputs (docs/audit.md)")
    meta = _shard_meta(p) if p.suffix == ".parquet" else None
    if meta is not None and meta.get("campaign") == c.name and meta.get("spec_hash") == c.spec.result_hash():
        run = int(meta["run"])
        if not 0 <= run < c.plan.runs:
            raise AuditError(f"target {p}: a shard of run {run} of {c.name!r}, whose plan has {c.plan.runs} runs")
        data = read_shard(p, campaign=c.name, spec_hash=c.spec.result_hash(), run=run, n_train=c.n_train,
                          n_test=c.n_test, mask=c.plan.mask(run))  # verified against this campaign's plan
        return Target(name=p.stem, kind="run", statistic=_statistic_of(agg, data.train_values, str(p)),
                      members=data.mask, run=run, mask=data.mask)
    if meta is not None:
        return _foreign_shard(agg, p, meta)
    return _table(agg, p)


def _foreign_shard(agg: Aggregator, p: Path, meta: dict) -> Target:
    c = agg.c
    other = CampaignPaths.of_shard(p.resolve())
    if not other.examples.exists():
        raise AuditError(f"target {p}: a shard of campaign {meta.get('campaign')!r}, but {other.examples} is missing, "
                         f"so its dataset cannot be checked; audit it where its campaign directory is intact")
    other_meta, _ = read_examples(other.examples)
    if other_meta.get("fingerprint") != c.fingerprint:
        raise AuditError(f"target {p}: trained on another dataset than campaign {c.name!r} (dataset fingerprint "
                         f"{other_meta.get('fingerprint')} in {other.examples}, expected {c.fingerprint} from "
                         f"{c.paths.examples}); a membership score needs the same examples in the same order")
    data = read_shard(p, campaign=meta.get("campaign"), spec_hash=meta.get("spec_hash"), run=int(meta["run"]),
                      n_train=c.n_train, n_test=c.n_test)
    return Target(name=f"{meta.get('campaign')}-{p.stem}", kind="shard",
                  statistic=_statistic_of(agg, data.train_values, str(p)), members=data.mask)


def _table(agg: Aggregator, p: Path) -> Target:
    c = agg.c
    n = c.n_train
    if p.suffix == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(p)
    elif p.suffix == ".parquet":
        table = pq.read_table(p)
        fp = json.loads((table.schema.metadata or {}).get(b"longtail", b"{}") or b"{}").get("fingerprint")
        if fp is not None and fp != c.fingerprint:
            raise AuditError(f"target {p}: its metadata names dataset fingerprint {fp}, campaign {c.name!r} has "
                             f"{c.fingerprint}; a membership score needs the same examples in the same order")
    else:
        raise AuditError(f"target {p}: expected a .parquet or .csv table (or a run shard), found {p.suffix or 'no'} "
                         f"suffix; the format is in docs/audit.md")
    names = table.column_names
    if "example" not in names:
        raise AuditError(f"target {p}: no 'example' column (found {names}); expected example, statistic or logits, "
                         f"and optionally member, label (docs/audit.md)")
    ex = np.asarray(table.column("example").to_numpy(zero_copy_only=False), np.int64)
    if len(ex) != n or not np.array_equal(np.sort(ex), np.arange(n)):
        raise AuditError(f"target {p}: example ids must cover the campaign's {n} training examples 0..{n - 1} "
                         f"exactly once; found {len(ex)} rows with ids {ex.min() if len(ex) else '-'}.."
                         f"{ex.max() if len(ex) else '-'}")
    order = np.argsort(ex)
    labels = c.labels["train_labels"]
    if "label" in names:
        lab = np.asarray(table.column("label").to_numpy(zero_copy_only=False))[order]
        bad = int((lab != labels).sum())
        if bad:
            raise AuditError(f"target {p}: {bad} of its labels differ from campaign {c.name!r}'s "
                             f"({c.paths.examples}); the table is of another dataset or another example order")
    logit_cols = sorted((k for k in names if k.startswith("logit_")), key=lambda k: int(k[6:]))
    if "statistic" in names:
        x = np.asarray(table.column("statistic").to_numpy(zero_copy_only=False), np.float64)[order]
    elif "logits" in names or logit_cols:
        if "logits" in names:
            col = table.column("logits").combine_chunks()
            z = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        else:
            z = np.stack([table.column(k).to_numpy(zero_copy_only=False) for k in logit_cols], axis=1)
        z = np.asarray(z, np.float64)[order]
        if z.shape[1] <= int(labels.max()):
            raise AuditError(f"target {p}: {z.shape[1]} logits per example, but labels go up to {labels.max()}")
        if agg.risk_source == "margin":
            rows = np.arange(n)
            others = z.copy()
            others[rows, labels] = -np.inf
            x = z[rows, labels] - others.max(axis=1)
        else:
            x = pv.statistic_from_logits(z, labels)
    else:
        raise AuditError(f"target {p}: needs a 'statistic' column or the logits ('logits' or logit_0, logit_1, ...); "
                         f"found {names}")
    if not np.isfinite(x).all():
        raise AuditError(f"target {p}: {int((~np.isfinite(x)).sum())} statistics are NaN or infinite")
    members = None
    if "member" in names:
        members = np.asarray(table.column("member").to_numpy(zero_copy_only=False)).astype(bool)[order]
    return Target(name=p.stem, kind="table", statistic=x, members=members)


@dataclass
class Scores:
    target: Target
    online: np.ndarray
    offline: np.ndarray
    fits: pv.Fits


def score(agg: Aggregator, target: Target, global_variance: bool | str = "auto") -> Scores:
    """Score one target; a folded run of this campaign is first taken out of the statistics."""
    sums = agg.risk
    if target.run is not None and agg.folded[target.run] and agg.c.plan.ratio_of_run[target.run] == agg.primary:
        sums = pv.without_run(sums, target.mask, target.statistic)
    f = pv.fit(sums, global_variance)
    return Scores(target, pv.online_score(f, target.statistic), pv.offline_score(f, target.statistic), f)


def evaluate(scores: list[Scores]) -> dict | None:
    """ROC AUC and TPR at low FPR of each attack, pooled over the targets whose membership is known."""
    known = [s for s in scores if s.target.members is not None]
    if not known:
        return None
    members = np.concatenate([s.target.members for s in known])
    by_attack = {"online": np.concatenate([s.online for s in known]),
                 "offline": np.concatenate([s.offline for s in known]),
                 "threshold": np.concatenate([s.target.statistic for s in known])}
    out = {"targets": len(known), "members": int(members.sum()), "non_members": int((~members).sum())}
    for name, sc in by_attack.items():
        out[name] = {"auc": pv.roc_auc(sc, members), **{f"tpr_at_fpr_{f:g}": pv.tpr_at_fpr(sc, members, f)
                                                        for f in FPRS}}
    return out


def _check_campaign(agg: Aggregator) -> None:
    c = agg.c
    if agg.risk_source is None:
        raise AuditError(f"campaign {c.name!r} stores none of {list(pv.STATISTICS)} ([train] store = "
                         f"{c.spec.train.store}), so no membership statistic exists; run a campaign that stores margins")
    if agg.risk.count_in.sum() == 0:
        raise AuditError(f"campaign {c.name!r} in {c.paths.root} has no folded runs with a {agg.risk_source!r} "
                         f"statistic yet; run or resume it first")


def open_for_audit(campaign_dir: str) -> Aggregator:
    agg = open_folded(campaign_dir)
    _check_campaign(agg)
    return agg


def open_folded(campaign_dir: str) -> Aggregator:
    """The campaign's fold with every finished shard in it, without Ray or the dataset."""
    c = create_or_open(None, campaign_dir, load_data=False)
    agg = Aggregator(c)
    for note in agg.notes:
        print(f"longtail: {note}", file=sys.stderr)  # a library: notes go to stderr, as the CLI's do
    # shards not in the checkpoint (or all of them, for a checkpoint without the risk sums) are folded
    # here in memory; the checkpoint stays the campaign driver's to write
    from orchestrator.driver import RunReport, fold_existing

    fold_existing(c, agg, RunReport(planned=c.plan.runs, already_done=0))
    agg.flush()
    return agg


def write_scores(dest: Path, s: Scores, campaign: Campaign, campaign_statistic: str) -> Path:
    cols = {"example": np.arange(campaign.n_train, dtype=np.int32),
            "label": campaign.labels["train_labels"].astype(np.int32), "statistic": s.target.statistic,
            "online": s.online, "offline": s.offline}
    if s.target.members is not None:
        cols["member"] = s.target.members
    path = AuditPaths(dest).scores(s.target.name)
    meta = {"campaign": campaign.name, "target": s.target.name, "kind": s.target.kind, "run": s.target.run,
            "statistic": campaign_statistic, "global_variance": s.fits.global_variance}
    pq.write_table(pa.table(cols).replace_schema_metadata({b"longtail": json.dumps(meta).encode()}), path,
                   compression="zstd")
    return path


def parse_runs(text: str, runs: int) -> list[int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise AuditError(f"--runs: expected START:STOP (run indices, STOP excluded), found {text!r}") from None
    if not 0 <= a < b <= runs:
        raise AuditError(f"--runs {text}: expected 0 <= START < STOP <= {runs} (the campaign's runs)")
    return list(range(a, b))


def format_metrics(metrics: dict) -> str:
    lines = [f"membership known for {metrics['targets']} targets ({metrics['members']} members, "
             f"{metrics['non_members']} non-members), pooled:",
             f"{'attack':<10} {'ROC AUC':>8} " + " ".join(f"{f'TPR@{f:.1%} FPR':>14}" for f in FPRS)]
    for name in ATTACKS:
        m = metrics[name]
        lines.append(f"{name:<10} {m['auc']:>8.3f} " + " ".join(f"{m[f'tpr_at_fpr_{f:g}']:>14.3f}" for f in FPRS))
    return "\n".join(lines)
