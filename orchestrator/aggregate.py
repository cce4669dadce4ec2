"""The fold of a campaign's shards into estimates, checkpointed so that a crash loses no folded run.

Shards are verified and buffered; `flush` folds the buffer with one GEMM; `save_checkpoint` writes the
sufficient statistics together with the bitmap of folded runs in one atomic file (state/fold.npz),
so the statistics and the record of what they contain can never disagree. A run is added at most
once: runs already folded or buffered are skipped, whatever order shards are offered in.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from estimators import estimates as est
from estimators import stats as st
from workers.shard import ShardData, read_shard
from workers.storage import atomic_path, atomic_write_text

from .campaign import Campaign

CHECKPOINT_VERSION = 1
RUN_FIELDS = ("test_acc", "train_acc_in", "train_acc_out", "train_seconds")
Z95 = 1.959963984540054


class Aggregator:
    def __init__(self, campaign: Campaign, from_scratch: bool = False):
        self.c = campaign
        self.influence = campaign.spec.estimates.influence != "none"
        runs = campaign.plan.runs
        self.folded = np.zeros(runs, bool)
        self.run_info = {k: np.full(runs, np.nan) for k in RUN_FIELDS}
        self.stats = st.zeros(campaign.n_train, campaign.n_test, influence=self.influence)
        self.notes: list[str] = []
        self._pending: list[tuple[int, ShardData]] = []
        if not from_scratch and campaign.paths.checkpoint.exists():
            self._load_checkpoint()

    # --- checkpoint -------------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        path = self.c.paths.checkpoint
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if int(arrays.get("version", -1)) != CHECKPOINT_VERSION or str(arrays.get("spec_hash")) != \
                self.c.spec.result_hash():
            self.notes.append(f"ignored {path}: written by another version or spec; refolding every shard")
            return
        stats = st.Stats.from_arrays(arrays)
        if self.influence and stats.infl_in is None:
            self.notes.append(f"ignored {path}: it has no influence sums and [estimates] influence asks for them; "
                              f"refolding every shard")
            return
        if not self.influence:
            stats.infl_in = None
        folded = arrays["folded"]
        k = len(folded)  # the plan may have grown since
        self.folded[:k] = folded
        for name in RUN_FIELDS:
            self.run_info[name][:k] = arrays[f"run_{name}"]
        self.stats = stats
        if stats.runs != int(self.folded.sum()):
            raise RuntimeError(f"{path}: holds {stats.runs} runs but marks {int(self.folded.sum())} as folded; "
                               f"delete it to refold from the shards")

    def save_checkpoint(self) -> None:
        self.flush()
        arrays = self.stats.arrays()
        arrays.update(version=np.asarray(CHECKPOINT_VERSION), spec_hash=np.asarray(self.c.spec.result_hash()),
                      folded=self.folded, **{f"run_{k}": v for k, v in self.run_info.items()})
        with atomic_path(self.c.paths.checkpoint) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    # --- folding ----------------------------------------------------------------------------------

    def folded_runs(self) -> set[int]:
        return set(np.flatnonzero(self.folded).tolist())

    def is_known(self, run: int) -> bool:
        return bool(self.folded[run]) or any(r == run for r, _ in self._pending)

    def read(self, run: int) -> ShardData:
        """Read and verify run `run`'s shard against this campaign (raises workers.shard.ShardError)."""
        c = self.c
        return read_shard(c.paths.shard(run), campaign=c.name, spec_hash=c.spec.result_hash(), run=run,
                          n_train=c.n_train, n_test=c.n_test, mask=c.plan.mask(run))

    def add(self, run: int, data: ShardData) -> bool:
        """Buffer a verified shard; False if the run is already folded or buffered."""
        if self.is_known(run):
            return False
        self._pending.append((run, data))
        if len(self._pending) >= self.c.spec.estimates.block_runs:
            self.flush()
        return True

    def flush(self) -> None:
        if not self._pending:
            return
        runs = [r for r, _ in self._pending]
        st.fold(self.stats,
                np.stack([d.mask for _, d in self._pending]),
                np.stack([d.train_correct for _, d in self._pending]),
                np.stack([d.test_correct for _, d in self._pending]))
        for r, d in self._pending:
            for k in RUN_FIELDS:
                self.run_info[k][r] = d.meta.get(k, np.nan)
        self.folded[runs] = True
        self._pending.clear()

    # --- estimates --------------------------------------------------------------------------------

    def write_estimates(self, complete: bool, extra: dict | None = None) -> dict:
        """Finalize the folded statistics into estimates/ and return the summary."""
        self.flush()
        c, e = self.c, self.c.spec.estimates
        paths = c.paths
        paths.estimates_dir.mkdir(parents=True, exist_ok=True)
        mem = est.memorization(self.stats)
        y_tr, y_te = c.labels["train_labels"], c.labels["test_labels"]
        cols = {"example": np.arange(c.n_train, dtype=np.int32), "label": y_tr.astype(np.int32)}
        if "train_groups" in c.labels:
            cols["group"] = c.labels["train_groups"].astype(np.int32)
        cols.update(mem=mem.mem, se=mem.se, ci_low=np.clip(mem.mem - Z95 * mem.se, -1, 1),
                    ci_high=np.clip(mem.mem + Z95 * mem.se, -1, 1), n_in=mem.n_in, n_out=mem.n_out,
                    acc_in=mem.acc_in, acc_out=mem.acc_out)
        _write_parquet(paths.memorization, pa.table(cols), self.stats.runs)

        pairs = None
        if self.influence:
            infl = est.influence(self.stats)
            with atomic_path(paths.influence) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, infl, allow_pickle=False)
            pairs = est.high_influence_pairs(mem.mem, infl, y_tr, y_te, e.mem_threshold, e.infl_threshold,
                                             e.same_class)
            _write_parquet(paths.pairs, pa.table({
                "train": pairs.train.astype(np.int32), "test": pairs.test.astype(np.int32),
                "label": y_te[pairs.test].astype(np.int32), "infl": pairs.infl.astype(np.float32),
                "mem": pairs.mem.astype(np.float32)}), self.stats.runs)
        summary = self.summary(mem, pairs, complete)
        summary.update(extra or {})
        atomic_write_text(paths.summary, json.dumps(summary, indent=2, default=_json_default) + "\n")
        return summary

    def summary(self, mem: est.Memorization, pairs: est.Pairs | None, complete: bool) -> dict:
        c, e = self.c, self.c.spec.estimates
        t = self.stats.runs
        acc = self.run_info["test_acc"][self.folded]
        finite = np.isfinite(mem.mem)

        def spread(a):
            a = np.asarray(a)
            return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())} if len(a) else None

        out = {
            "campaign": c.name,
            "complete": complete,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "runs": {"planned": c.plan.runs, "folded": t},
            "design": c.plan.design,
            "subset_ratio": c.spec.campaign.subset_ratio,
            "subset_size": c.plan.subset_size,
            "n_train": c.n_train,
            "n_test": c.n_test,
            "counts": {"n_in": spread(mem.n_in), "n_out": spread(mem.n_out)},
            "error_bound_rms": est.error_bound(t, c.spec.campaign.subset_ratio) if t else None,
            "test_accuracy": {"mean": float(acc.mean()), "std": float(acc.std())} if len(acc) else None,
            "memorization": {
                "defined": int(finite.sum()),
                "mean": float(np.nanmean(mem.mem)) if finite.any() else None,
                "mean_se": float(np.nanmean(mem.se)) if finite.any() else None,
                f"share_at_least_{e.mem_threshold}": float((mem.mem[finite] >= e.mem_threshold).mean())
                if finite.any() else None,
                "held_out_accuracy_mean": float(np.nanmean(mem.acc_out)) if finite.any() else None,
            },
        }
        if pairs is not None:
            per_test = np.bincount(pairs.test, minlength=c.n_test)
            out["high_influence_pairs"] = {
                "mem_threshold": e.mem_threshold, "infl_threshold": e.infl_threshold, "same_class": e.same_class,
                "pairs": int(len(pairs.train)),
                "test_examples": int((per_test > 0).sum()),
                "test_examples_with_one_influencer": int((per_test == 1).sum()),
            }
        return out


def _write_parquet(path, table: pa.Table, runs: int) -> None:
    table = table.replace_schema_metadata({b"longtail": json.dumps({"runs": runs}).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
