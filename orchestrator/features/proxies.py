"""The fold hook and the estimates files of training-dynamics proxies and out-of-subset triage.

`ProxyFold` rides along the Aggregator's fold (orchestrator/fold.py): every main-ratio run adds its
training dynamics (when its shard has them) to estimators.proxies.Dynamics and its predicted labels of
the examples it did not train on to estimators.triage.OutOfSubset; both are saved in the fold checkpoint
under "proxy." keys. `write` turns them into estimates/ files (docs/proxies-and-triage.md):

    proxies.parquet          per example: each proxy from the first run and averaged over all runs
    proxy_agreement.parquet  per proxy and number of first runs: agreement statistics with 95% intervals
    triage.parquet           per example: out-of-subset distribution (mode, shares, entropy) and category
    pred_probs.npy           (n_train, classes) out-of-sample predicted-label frequencies, for cleanlab
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from estimators import proxies as px
from estimators import triage as tr
from workers.storage import arrow_source

PREFIX = "proxy."
NO_DYNAMICS = ("no run of this campaign recorded training dynamics (shards written without them); add "
               "\"dynamics\" to [train] store (it does not change the spec hash) and `longtail resume` the "
               "campaign with more runs, or start a new one")


def num_classes(campaign) -> int:
    """Classes of the campaign's dataset, from plan/examples.parquet's metadata (no data loaded)."""
    import json

    source, filesystem = arrow_source(campaign.paths.examples)
    meta = json.loads(pq.read_schema(source, filesystem=filesystem).metadata[b"longtail"])
    return int(meta["num_classes"])


class ProxyFold:
    def __init__(self, campaign, main_runs: int):
        e = campaign.spec.estimates
        self.epochs = campaign.spec.train.epochs
        self.main_runs = main_runs
        self.dynamics = px.Dynamics.zeros(campaign.n_train, main_runs)
        # a dense table when it fits a quarter of memory_gb (the rest is influence's)
        self.oos = tr.OutOfSubset(campaign.n_train, num_classes(campaign), e.memory_gb * 1e9 / 4, e.triage_slots)

    def add(self, position: int, mask: np.ndarray, train_pred: np.ndarray, dynamics: dict | None) -> None:
        self.oos.add(~mask, train_pred)
        if dynamics is not None:
            self.dynamics.add(position, mask, dynamics, self.epochs)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"{PREFIX}dyn.{k}": v for k, v in self.dynamics.arrays().items()}
        out.update({f"{PREFIX}oos.{k}": v for k, v in self.oos.arrays().items()})
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> str:
        """Restore from checkpoint arrays; returns why it cannot ("" when it did)."""
        if f"{PREFIX}oos.total" not in arrays:
            return "it has no out-of-subset prediction counts (written before longtail kept them)"
        dyn = {k[len(PREFIX) + 4:]: v for k, v in arrays.items() if k.startswith(PREFIX + "dyn.")}
        oos = {k[len(PREFIX) + 4:]: v for k, v in arrays.items() if k.startswith(PREFIX + "oos.")}
        loaded = tr.OutOfSubset.from_arrays(oos)
        if loaded.dense != self.oos.dense:
            return "[estimates] memory_gb or triage_slots changed how out-of-subset predictions are counted"
        self.oos = loaded
        d = px.Dynamics.from_arrays(dyn)
        self.dynamics = d if d.levels == px.levels(self.main_runs) else d.regrown(self.main_runs)
        return ""


def _table(d: dict) -> pa.Table:
    return pa.table({k: np.asarray(v) for k, v in d.items()})


def proxies_table(fold: ProxyFold) -> pa.Table | None:
    dyn = fold.dynamics
    if not dyn.folded:
        return None
    n = dyn.sums.shape[2]
    cols = {"example": np.arange(n, dtype=np.int32), "runs": dyn.counts[-1].astype(np.int32)}
    first, mean = dyn.mean(0), dyn.mean()
    for p, name in enumerate(px.PROXIES):
        cols[f"{name}_first"] = first[p].astype(np.float32)
        cols[f"{name}_mean"] = mean[p].astype(np.float32)
    return _table(cols)


def agreement_table(rows: list[px.Agreement]) -> pa.Table:
    cols = {"proxy": [r.proxy for r in rows], "runs": [r.runs for r in rows], "examples": [r.examples for r in rows],
            "mean_runs_averaged": [r.mean_averaged for r in rows]}
    for s in px.STATISTICS:
        cols[s] = [r.value[s] for r in rows]
        cols[f"{s}_low"] = [r.ci_low[s] for r in rows]
        cols[f"{s}_high"] = [r.ci_high[s] for r in rows]
    return pa.table(cols)


def triage_table(fold: ProxyFold, y: np.ndarray, mem: np.ndarray, e) -> tuple[pa.Table, tr.Distribution, np.ndarray]:
    lab, cnt = fold.oos.table()
    d = tr.distribution(lab, cnt, fold.oos.total, y, fold.oos.bound())
    cat = tr.triage(d, y, mem, mem_threshold=e.triage_mem, agree=e.triage_agree, split=e.triage_split)
    t = _table({"example": np.arange(len(y), dtype=np.int32), "label": y.astype(np.int32), "mem": mem,
                "out_predictions": d.total.astype(np.int32), "mode": d.mode.astype(np.int32),
                "mode_share": d.mode_share, "label_share": d.label_share, "other": d.other.astype(np.int32),
                "mislabeled_score": d.other_share, "entropy_bits": d.entropy, "share_error_bound": d.bound,
                "triage": cat})
    return t, d, cat


def summary(rows: list[px.Agreement], cat: np.ndarray, fold: ProxyFold, e) -> dict:
    """The summary.json entries: agreement with the first run and with all runs, and the triage counts."""
    out = {"triage": {"mem_threshold": e.triage_mem, "agree": e.triage_agree, "split": e.triage_split,
                      "counting": "dense" if fold.oos.dense else f"misra-gries, {fold.oos.slots} slots",
                      **{c: int((cat == c).sum()) for c in tr.CATEGORIES}}}
    if not fold.dynamics.folded:
        out["proxies"] = {"runs_with_dynamics": 0, "missing": NO_DYNAMICS}
        return out
    if not rows:  # an intermediate write: the agreement comes with the final estimates
        out["proxies"] = {"runs_with_dynamics": fold.dynamics.folded}
        return out
    last = max(r.runs for r in rows)
    first = {r.proxy: {s: r.value[s] for s in px.STATISTICS} for r in rows if r.runs == 1}
    pick = {r.proxy: {"runs": r.runs, "examples": r.examples, "mean_runs_averaged": r.mean_averaged,
                      **{s: r.value[s] for s in px.STATISTICS},
                      **{f"{s}_ci": [r.ci_low[s], r.ci_high[s]] for s in px.STATISTICS},
                      "first_run": first.get(r.proxy)}
            for r in rows if r.runs == last}
    out["proxies"] = {"runs_with_dynamics": fold.dynamics.folded, "all_runs": pick}
    return out


def write(agg, mem: np.ndarray, write_parquet, write_npy, final: bool) -> dict:
    """Write the proxy and triage estimates of `agg` (an Aggregator) for memorization `mem`; returns the
    summary entries. The bootstrap intervals and pred_probs are written only when `final`."""
    c, e, fold = agg.c, agg.c.spec.estimates, agg.proxies
    y = c.labels["train_labels"]
    t, _, cat = triage_table(fold, y, mem, e)
    runs = agg.stats.runs
    write_parquet(c.paths.triage, t, runs)
    pred_probs_bytes = 4 * c.n_train * fold.oos.classes
    if final and pred_probs_bytes <= e.memory_gb * 1e9:  # dense by nature: 5 GB at ImageNet scale
        write_npy(c.paths.pred_probs, fold.oos.pred_probs())
    rows = []
    table = proxies_table(fold)
    if table is not None:
        write_parquet(c.paths.proxies, table, fold.dynamics.folded)
        if final:  # the curve sorts n examples per level and proxy: not at every checkpoint
            rows = px.curve(fold.dynamics, mem, bootstrap=200)
            write_parquet(c.paths.proxy_agreement, agreement_table(rows), fold.dynamics.folded)
    out = summary(rows, cat, fold, e)
    if pred_probs_bytes > e.memory_gb * 1e9:
        out["triage"]["pred_probs"] = (f"not written: {pred_probs_bytes / 1e9:.1f} GB exceeds [estimates] memory_gb "
                                       f"= {e.memory_gb:g}; raise it and run `longtail estimate` to write it")
    return out


def format_table(rows: list[dict]) -> list[str]:
    """The agreement table as text lines (for `longtail proxies`)."""
    lines = [f"{'proxy':<12} {'runs':>5} {'examples':>8}  " + "  ".join(f"{s:>20}" for s in px.STATISTICS)]
    for r in rows:
        cells = [f"{r[s]:.3f} [{r[s + '_low']:.2f}, {r[s + '_high']:.2f}]" if np.isfinite(r[s]) else "n/a"
                 for s in px.STATISTICS]
        lines.append(f"{r['proxy']:<12} {r['runs']:>5} {r['examples']:>8}  " + "  ".join(f"{x:>20}" for x in cells))
    return lines


def one_line(summary: dict) -> str | None:
    """The proxies' Spearman agreement over all runs, in one line (the demo prints it)."""
    p = (summary.get("proxies") or {}).get("all_runs")
    if not p:
        return None
    parts = [f"{name} {v['spearman']:.2f} [{v['spearman_ci'][0]:.2f}, {v['spearman_ci'][1]:.2f}]"
             for name, v in p.items() if v.get("spearman") is not None and v["spearman_ci"][0] is not None]
    first = next(iter(p.values()))
    return (f"proxy agreement with memorization (Spearman, 95% CI; each proxy averaged over the "
            f"{first['mean_runs_averaged']:.0f} runs of {first['runs']} that trained on an example, on average): "
            + ", ".join(parts))


def _read(path) -> pa.Table | None:
    source, filesystem = arrow_source(path)
    try:
        return pq.read_table(source, filesystem=filesystem)
    except FileNotFoundError:
        return None


def read_triage(paths) -> dict[str, np.ndarray] | None:
    t = _read(paths.triage)
    return None if t is None else {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}


def describe(triage: dict[str, np.ndarray], example: int) -> str:
    """'mislabeled (mode 7, 83%)' for one example of a triage table; '' when it is not triaged."""
    cat = str(triage["triage"][example])
    if not cat:
        return ""
    return f"{cat} (mode {int(triage['mode'][example])}, {triage['mode_share'][example]:.0%})"


def read_agreement(paths) -> list[dict] | None:
    t = _read(paths.proxy_agreement)
    return None if t is None else t.to_pylist()
