"""The fold of a campaign's shards, checkpointed so that a crash loses no folded run.

Shards are verified and buffered; `flush` folds the buffer with one GEMM per target; the checkpoint
(state/fold.npz) holds, in one atomically replaced file, the sufficient statistics of every subset
ratio, those of the even and odd halves of the main ratio's runs (for the split-half check), the
runs' test outcomes (bit-packed correctness, float16 soft values: what tiled influence is computed
from), and the bitmap of folded runs, so the statistics and the record of what they contain can never
disagree. A run is added at most once: runs already folded or buffered are skipped.
"""

from __future__ import annotations

import zipfile

import numpy as np

from estimators import estimates as est
from estimators import precision
from estimators import privacy as pv
from estimators import stats as st
from workers.datasets import Dataset, dataset_fingerprint
from workers.shard import ShardData, ShardError, read_shard
from workers.storage import atomic_path, open_input

from orchestrator import plan as planning
from orchestrator import spec as specs
from orchestrator.campaign import Campaign, CampaignError, write_examples
from orchestrator.paths import CampaignPaths

CHECKPOINT_VERSION = 2
RUN_FIELDS = ("test_acc", "train_acc_in", "train_acc_out", "train_seconds")


def influence_mode(campaign: Campaign) -> str:
    """The influence output mode, with 'auto' resolved against [estimates] memory_gb."""
    e = campaign.spec.estimates
    return precision.influence_mode(e.influence, e.memory_gb, campaign.n_train, campaign.n_test, len(e.soft))


def checkpoint_run_field(campaign: Campaign, name: str) -> np.ndarray | None:
    """One per-run field (RUN_FIELDS, e.g. "test_acc") of every folded run, read from the fold checkpoint
    when it is this campaign's (version and spec hash); None when there is none, or it is foreign or
    unreadable: the checkpoint is only a cache of the shards, which say the same."""
    path = campaign.paths.checkpoint
    if not path.exists():
        return None
    try:
        with open_input(path) as f, np.load(f, allow_pickle=False) as z:
            if int(z["version"]) != CHECKPOINT_VERSION or str(z["spec_hash"]) != campaign.spec.result_hash():
                return None
            return z[f"run_{name}"][z["folded"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


class Aggregator:
    def __init__(self, campaign: Campaign, from_scratch: bool = False):
        self.c = campaign
        spec, plan = campaign.spec, campaign.plan
        self.mode = influence_mode(campaign)
        self.soft = tuple(spec.estimates.soft)
        self.targets = (st.CORRECT,) + self.soft
        self.primary = plan.ratios.index(spec.primary_ratio)
        runs = plan.runs
        n, nt = campaign.n_train, campaign.n_test
        self.folded = np.zeros(runs, bool)
        self.run_info = {k: np.full(runs, np.nan) for k in RUN_FIELDS}
        self.groups = [st.zeros(n, nt, dense=self.mode == "dense" and k == self.primary, soft=self.soft)
                       for k in range(len(plan.ratios))]
        self.halves = [st.zeros(n, nt, dense=False, soft=self.soft) for _ in range(2)]
        self.test_bits = np.zeros((runs, (nt + 7) // 8), np.uint8)
        self.test_soft = {name: np.zeros((runs, nt), np.float16) for name in self.soft}
        # privacy risk (estimators/privacy.py): the per-run statistic's sums over the main ratio's runs
        self.risk_source = pv.choose_statistic(spec.train.store)
        self.risk = pv.zeros(n)
        self.notes: list[str] = []
        self._pending: list[tuple[int, ShardData]] = []
        # position of each run among the runs of its ratio: its parity picks the split half
        self.position = np.zeros(runs, np.int64)
        for k in range(len(plan.ratios)):
            group = plan.runs_of_ratio(k)
            self.position[group] = np.arange(len(group))
        # training-dynamics proxies and out-of-subset predictions (orchestrator/features/proxies.py)
        from orchestrator.features.proxies import ProxyFold

        self.proxies = ProxyFold(campaign, len(plan.runs_of_ratio(self.primary)))
        if not from_scratch and campaign.paths.checkpoint.exists():
            self._load_checkpoint()

    @property
    def stats(self) -> st.Stats:
        """The statistics of the main ratio's runs: memorization and influence come from these."""
        return self.groups[self.primary]

    # --- checkpoint -------------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        path = self.c.paths.checkpoint
        try:  # a truncated or foreign file is only a lost cache: the shards are the truth
            with open_input(path) as f, np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            self.notes.append(f"ignored {path}: it is unreadable ({type(e).__name__}; truncated or corrupt); "
                              f"refolding every shard")
            return
        why = ""
        if int(arrays.get("version", -1)) != CHECKPOINT_VERSION:
            why = "it was written by another version of longtail"
        elif str(arrays.get("spec_hash")) != self.c.spec.result_hash():
            why = "it was written for another spec"
        elif tuple(np.atleast_1d(arrays["soft"]).tolist()) != self.soft:
            why = "[estimates] soft changed"
        elif self.mode == "dense" and f"group{self.primary}.target.correct.infl_in" not in arrays:
            why = "dense influence is asked for and the checkpoint has no dense sums"
        elif "risk.count_in" not in arrays:
            why = "it has no privacy-risk sums (written before longtail kept them)"
        else:
            why = self.proxies.load(arrays)
        if why:
            self.notes.append(f"ignored {path}: {why}; refolding every shard")
            return

        def stats(prefix):
            sub = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            s = st.Stats.from_arrays(sub)
            if not s.dense or self.mode == "dense":
                return s
            for t in s.targets.values():  # dense sums no longer wanted
                t.infl_in = t.infl_sq_in = None
            return s

        k = len(arrays["folded"])  # the plan may have grown since
        self.groups = [stats(f"group{g}.") for g in range(len(self.c.plan.ratios))]
        self.halves = [stats(f"half{h}.") for h in range(2)]
        self.risk = pv.ScoreSums.from_arrays(arrays, "risk.")
        self.folded[:k] = arrays["folded"]
        self.test_bits[:k] = arrays["test_bits"]
        for name in self.soft:
            self.test_soft[name][:k] = arrays[f"test_soft.{name}"]
        for name in RUN_FIELDS:
            self.run_info[name][:k] = arrays[f"run_{name}"]
        if sum(g.runs for g in self.groups) != int(self.folded.sum()):
            raise CampaignError(f"{path}: holds {sum(g.runs for g in self.groups)} runs but marks "
                                f"{int(self.folded.sum())} as folded, expected equal counts; it is only a cache of "
                                f"the shards: delete it, then `longtail resume {self.c.paths.root}` refolds them")

    def save_checkpoint(self) -> None:
        self.flush()
        arrays = self.checkpoint_arrays()
        with atomic_path(self.c.paths.checkpoint) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """What state/fold.npz holds (uncompressed: its size is the sum of these arrays' sizes)."""
        arrays = {"version": np.asarray(CHECKPOINT_VERSION), "spec_hash": np.asarray(self.c.spec.result_hash()),
                  "mode": np.asarray(self.mode), "soft": np.array(self.soft, dtype=str), "folded": self.folded,
                  "test_bits": self.test_bits}
        for g, s in enumerate(self.groups):
            arrays.update({f"group{g}.{k}": v for k, v in s.arrays().items()})
        for h, s in enumerate(self.halves):
            arrays.update({f"half{h}.{k}": v for k, v in s.arrays().items()})
        arrays.update({f"test_soft.{k}": v for k, v in self.test_soft.items()})
        arrays.update(self.risk.arrays("risk."))
        arrays.update(self.proxies.arrays())
        arrays.update({f"run_{k}": v for k, v in self.run_info.items()})
        return arrays

    # --- folding ----------------------------------------------------------------------------------

    def folded_runs(self) -> set[int]:
        return set(np.flatnonzero(self.folded).tolist())

    def is_known(self, run: int) -> bool:
        return bool(self.folded[run]) or any(r == run for r, _ in self._pending)

    def read(self, run: int) -> ShardData:
        """Read and verify run `run`'s shard against this campaign (raises workers.shard.ShardError)."""
        c = self.c
        if getattr(self, "_spec_hash", None) is None:  # hashing the spec costs more than verifying a shard
            self._spec_hash = c.spec.result_hash()
        data = read_shard(c.paths.shard(run), campaign=c.name, spec_hash=self._spec_hash, run=run,
                          n_train=c.n_train, n_test=c.n_test, mask=c.plan.mask(run))
        missing = sorted(set(self.soft) - set(data.train_values))
        if missing:
            raise ShardError(f"{c.paths.shard(run)}: has no {missing} values, which [estimates] soft needs")
        return data

    def add(self, run: int, data: ShardData) -> bool:
        """Buffer a verified shard; False if the run is already folded or buffered."""
        if self.is_known(run):
            return False
        self._pending.append((run, data))
        if len(self._pending) >= self.c.spec.estimates.block_runs:
            self.flush()
        return True

    def _fold(self, stats: st.Stats, items: list[tuple[int, ShardData]]) -> None:
        if not items:
            return
        train = {st.CORRECT: np.stack([d.train_correct for _, d in items])}
        test = {st.CORRECT: np.stack([d.test_correct for _, d in items])}
        for name in self.soft:
            train[name] = np.stack([d.train_values[name] for _, d in items])
            test[name] = np.stack([d.test_values[name] for _, d in items])
        st.fold(stats, np.stack([d.mask for _, d in items]), train, test)

    def flush(self) -> None:
        if not self._pending:
            return
        ratio_of = self.c.plan.ratio_of_run
        for g, stats in enumerate(self.groups):
            self._fold(stats, [(r, d) for r, d in self._pending if ratio_of[r] == g])
        main = [(r, d) for r, d in self._pending if ratio_of[r] == self.primary]
        for h, stats in enumerate(self.halves):
            self._fold(stats, [(r, d) for r, d in main if self.position[r] % 2 == h])
        self._fold_risk(main)
        for r, d in main:
            self.proxies.add(int(self.position[r]), d.mask, d.train_pred, d.dynamics)
        for r, d in self._pending:
            self.test_bits[r] = np.packbits(d.test_correct)
            for name in self.soft:
                self.test_soft[name][r] = d.test_values[name]
            for k in RUN_FIELDS:
                self.run_info[k][r] = d.meta.get(k, np.nan)
            self.folded[r] = True
        self._pending.clear()

    def risk_statistic(self, data: ShardData) -> np.ndarray | None:
        """The privacy-risk statistic of every training example in one run (None if the shard lacks it)."""
        return pv.statistic(data.train_values, self.c.labels["train_labels"], self.risk_source)

    def _fold_risk(self, items: list[tuple[int, ShardData]]) -> None:
        # a run whose statistic is not finite everywhere (float16 logits that overflowed) is left out of the
        # risk sums rather than poisoning them; audit refuses such a run as a target
        rows = [(d.mask, x) for _, d in items
                if (x := self.risk_statistic(d)) is not None and np.isfinite(x).all()]
        if rows:
            pv.fold_scores(self.risk, np.stack([m for m, _ in rows]), np.stack([x for _, x in rows]))

    # --- fold actors (orchestrator/foldpool.py) -----------------------------------------------------

    def partial(self) -> dict:
        """Everything this fold holds, for the driver's Aggregator of the same campaign to `merge`: a fold
        actor's share of the runs. The sums are additive, so merging shares gives the fold of their union
        (exactly for 0/1 targets, which are integer counts; to float rounding for soft targets, the
        privacy-risk sums and the proxies, which are then added in another order)."""
        self.flush()
        runs = np.flatnonzero(self.folded)
        oos = self.proxies.oos
        return {"runs": runs, "groups": [s.arrays() for s in self.groups],
                "halves": [s.arrays() for s in self.halves], "risk": self.risk.arrays(""),
                "test_bits": self.test_bits[runs], "test_soft": {k: v[runs] for k, v in self.test_soft.items()},
                "run_info": {k: v[runs] for k, v in self.run_info.items()},
                "dynamics": self.proxies.dynamics.arrays(),
                "oos": oos.arrays() if oos.dense else None,
                "oos_rows": oos.rows if isinstance(oos, DeferredCounts) else []}

    def defer_summary_counts(self) -> None:
        """In a fold actor: keep each run's out-of-subset predictions instead of counting them, when they
        are counted by a Misra-Gries summary, whose content depends on the order of the runs and which
        two actors therefore cannot merge; the driver counts them when it merges this share."""
        if not self.proxies.oos.dense:
            self.proxies.oos = DeferredCounts()

    def merge(self, part: dict) -> int:
        """Add a fold actor's `partial()` (runs this fold does not hold); returns how many runs it added."""
        runs = np.asarray(part["runs"], np.int64)
        known = [int(r) for r in runs if self.is_known(int(r))]
        if known:  # never merge a run twice: the statistics could not take it out again
            raise CampaignError(f"a fold actor sent runs {known[:5]} that the driver's fold already holds, expected "
                                f"runs folded nowhere else; nothing of that share was merged. Their shards are on "
                                f"disk: `longtail resume {self.c.paths.root}` refolds what the checkpoint lacks")
        if not len(runs):
            return 0
        dyn, theirs = self.proxies.dynamics, part["dynamics"]
        if list(theirs["levels"]) != list(dyn.levels):
            raise CampaignError(f"a fold actor's proxy sums have levels {list(theirs['levels'])}, expected "
                                f"{list(dyn.levels)} (the plan changed under it); nothing of that share was merged")
        stats = [st.Stats.from_arrays(a) for a in part["groups"] + part["halves"]]
        for mine, other in zip(self.groups + self.halves, stats):
            if set(mine.targets) != set(other.targets) or mine.n_in.shape != other.n_in.shape:
                raise CampaignError(f"a fold actor's sums have targets {sorted(other.targets)} over "
                                    f"{other.n_train} training examples, expected {sorted(mine.targets)} over "
                                    f"{mine.n_train}; nothing of that share was merged")
        for mine, other in zip(self.groups + self.halves, stats):
            _add_stats(mine, other)
        for name, v in part["risk"].items():
            getattr(self.risk, name)[...] += v
        self.test_bits[runs] = part["test_bits"]
        for name in self.soft:
            self.test_soft[name][runs] = part["test_soft"][name]
        for name in RUN_FIELDS:
            self.run_info[name][runs] = part["run_info"][name]
        dyn.sums += theirs["sums"]
        dyn.counts += theirs["counts"]
        dyn.folded += int(theirs["folded"])
        dyn.epochs = max(dyn.epochs, int(theirs["epochs"]))
        oos = self.proxies.oos
        if part["oos"] is not None:
            oos.total += part["oos"]["total"]
            oos.counts += part["oos"]["counts"]
        for out, pred in part["oos_rows"]:
            oos.add(np.unpackbits(out, count=self.c.n_train).astype(bool), pred)
        self.folded[runs] = True
        return len(runs)

    # --- what estimates are computed from ---------------------------------------------------------

    def main_runs(self, half: int | None = None) -> np.ndarray:
        """Folded runs of the main ratio (or of one half of them), in run order."""
        runs = np.flatnonzero(self.folded & (self.c.plan.ratio_of_run == self.primary))
        return runs if half is None else runs[self.position[runs] % 2 == half]

    def outcomes(self, target: str, runs: np.ndarray):
        """The test values of `target` over `runs`, for tiled influence."""
        from estimators.influence import Outcomes

        if target == st.CORRECT:
            x = np.unpackbits(self.test_bits[runs], axis=1, count=self.c.n_test)
            return Outcomes(x, binary=True)
        return Outcomes(self.test_soft[target][runs], binary=False)

    def mask_columns(self, runs: np.ndarray):
        plan = self.c.plan
        return lambda idx: plan.columns(runs, idx)

    def share_at_target(self) -> float | None:
        """Share of the main memorization estimates whose standard error reached [estimates] target_se.

        The standard error used here is the Agresti-Caffo half-width / 1.96: unlike the plug-in one it
        is not 0 after a few runs that all agree, so stopping cannot happen by accident."""
        target = self.c.spec.estimates.target_se
        if not target:
            return None
        self.flush()
        m = est.memorization(self.stats)
        return est.share_at_target((m.ci_high - m.ci_low) / (2 * est.Z95), target)


class DeferredCounts:
    """Stands in for a Misra-Gries `OutOfSubset` in a fold actor (Aggregator.defer_summary_counts): keeps
    each run's out-of-subset predictions, packed, for the driver to count in its own summary."""

    dense = False

    def __init__(self):
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, out_of_subset: np.ndarray, pred: np.ndarray) -> None:
        self.rows.append((np.packbits(np.asarray(out_of_subset, bool)), np.array(pred)))

    def arrays(self) -> dict[str, np.ndarray]:
        raise CampaignError("a fold actor's deferred out-of-subset counts are merged, never checkpointed")


def _add_stats(into: st.Stats, other: st.Stats) -> None:
    """into += other, in place (both of one campaign: the same shapes and targets, checked by merge)."""
    into.runs += other.runs
    into.n_in += other.n_in
    for name, sums in into.targets.items():
        theirs = other.targets[name]
        for k, v in sums.__dict__.items():
            if isinstance(v, np.ndarray):
                v += getattr(theirs, k)


def fixed_sizes(spec: specs.Spec, data: Dataset) -> dict[str, int]:
    """Bytes that plan/examples.parquet and state/fold.npz will take for a campaign of `spec` on `data`
    (what `validate` reports): the example table is written, and an empty fold of the campaign built,
    in a temporary directory removed at once, and the empty fold's checkpoint is written to a sink that
    only counts bytes (it is uncompressed, so an empty one has the size of a full one; np.zeros maps no
    memory, so this stays cheap for dense influence)."""
    import io
    import tempfile

    class Counter(io.RawIOBase):  # seekable, as a file is: zipfile then writes no data descriptors
        n = pos = 0

        def writable(self):
            return True

        def seekable(self):
            return True

        def tell(self):
            return self.pos

        def seek(self, offset, whence=0):
            self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.n + offset
            return self.pos

        def write(self, b):
            self.pos += len(b)
            self.n = max(self.n, self.pos)
            return len(b)

    c = spec.campaign
    plan = planning.make_plan(c.design, c.seed, data.n_train, c.ratios, c.runs)
    labels = {"train_labels": data.y_train, "test_labels": data.y_test}
    with tempfile.TemporaryDirectory(prefix="longtail-validate-") as tmp:
        paths = CampaignPaths(tmp)
        paths.make_dirs()
        write_examples(paths.examples, data, dataset_fingerprint(data))
        probe = Campaign(paths, spec, plan, data, labels, "", [])
        sink = Counter()
        np.savez(sink, **Aggregator(probe, from_scratch=True).checkpoint_arrays())
        return {"examples": paths.examples.stat().st_size, "checkpoint": sink.n}
