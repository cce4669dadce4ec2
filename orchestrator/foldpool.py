"""Shard reading and verification spread over a Ray cluster, for refolding many shards at once.

Reading and verifying a shard is most of what folding it costs the driver (docs/performance.md, "At
the paper's scale": about 4 ms of the 5 ms a CIFAR-100-shaped shard takes on two cores, and 20 times
as much at the ImageNet shape). `longtail estimate DIR --address ADDR --fold-actors N` refolds a
campaign with N fold actors, each on its own CPU of the cluster, reading and verifying a disjoint
share of the shards (run r goes to actor r mod N) from the campaign directory every node sees, and
sending the verified arrays back through the object store. The driver keeps the fold itself: the
additive sums are then a few milliseconds a shard, and every run still passes through the one
Aggregator, so "folded exactly once" stays the Aggregator's guarantee (a run already folded or
buffered is skipped whatever the actors send) and the result equals an in-process refold exactly.
Reads are pipelined: the next batch is in flight while the driver folds the current one.

`LiveFold` is the same actors during a campaign (`[resources] fold_actors = N`): there the actors
fold as well, since the driver must keep up with the cluster. The driver hands each finished run to
an actor by its number (the actor reads the shard from the campaign directory); the actor verifies
it and answers with its test accuracy or why it failed; the driver's accuracy gate then tells it to
fold the run or drop it. Every checkpoint (and the end) the driver takes each actor's sums and
merges them into its one Aggregator (`Aggregator.merge`), which marks those runs folded: state/
fold.npz is then exactly what the driver alone would have written, and a run is folded once since
the driver hands each run to one actor at most and merges each actor's share once. Until a merge the
actors' work lives only in them: a driver that dies loses it, and the next driver refolds those
runs from their shards, as every run the checkpoint lacks. An actor that dies loses its share the
same way; the driver then reads and folds those runs itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator


class FoldActor:
    """Reads and verifies shards of one campaign against its plan and spec."""

    def __init__(self, root: str, live: bool = False):
        from orchestrator.fold import Aggregator
        from orchestrator.campaign import create_or_open

        self.agg = Aggregator(create_or_open(None, root, load_data=False), from_scratch=True)
        self.held: dict = {}  # run -> verified ShardData the driver has not yet said to fold or drop
        if live:
            self.agg.defer_summary_counts()

    def read(self, runs: list[int]) -> list[tuple[int, object, str]]:
        """(run, verified ShardData or None, why not) for every run."""
        from workers.shard import ShardError

        out = []
        for r in runs:
            try:
                out.append((r, self.agg.read(r), ""))
            except ShardError as e:
                out.append((r, None, str(e)))
        return out

    # --- during a campaign (LiveFold) ---------------------------------------------------------------

    def verify(self, runs: list[int]) -> list[tuple[int, float, str]]:
        """Read and verify each run's shard and keep it; (run, test accuracy, "") or (run, nan, why not)."""
        held = self.held
        out = []
        for r, data, error in self.read(runs):
            if data is None:
                out.append((r, float("nan"), error))
            else:
                held[r] = data
                out.append((r, float(data.meta.get("test_acc", float("nan"))), ""))
        return out

    def fold(self, runs: list[int], drop: list[int]) -> None:
        """Fold kept runs `runs` into this actor's share; forget `drop` (the accuracy gate refused them)."""
        held = self.held
        for r in drop:
            held.pop(r, None)
        for r in runs:
            self.agg.add(r, held.pop(r))
        if self.agg.mode != "dense":  # the sums of a run cost the same in any block: then `take` waits for nothing
            self.agg.flush()

    def take(self) -> dict:
        """This actor's share since the last take (Aggregator.partial), and start a new one."""
        from orchestrator.fold import Aggregator

        part = self.agg.partial()
        self.agg = Aggregator(self.agg.c, from_scratch=True)
        self.agg.defer_summary_counts()
        return part

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class FoldPool:
    """N FoldActors on the Ray cluster this process is connected to."""

    def __init__(self, ray, root, actors: int, batch: int = 8):
        remote = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(FoldActor)
        self.ray, self.batch = ray, batch
        self.actors = [remote.remote(str(root)) for _ in range(actors)]

    def read(self, runs: list[int]) -> Iterator[tuple[int, object, str]]:
        """Every run's (run, data, error), in the order of `runs`; each actor has up to two batches in flight."""
        runs = list(dict.fromkeys(runs))  # each run read once
        n = len(self.actors)
        # round-robin over actors so that the next batch of every actor is queued behind its current one
        pending = _interleave([[runs[a::n][i:i + self.batch] for i in range(0, len(runs[a::n]), self.batch)]
                               for a in range(n)])
        refs, done, nxt = [], {}, 0
        while pending or refs:
            while pending and len(refs) < 2 * n:
                a, part = pending.pop(0)
                refs.append(self.actors[a].read.remote(part))
            ready, refs = self.ray.wait(refs, num_returns=1)
            for item in self.ray.get(ready[0]):
                done[item[0]] = item
            while nxt < len(runs) and runs[nxt] in done:
                yield done.pop(runs[nxt])
                nxt += 1

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


@dataclass
class Verified:
    """A run whose shard a fold actor verified and keeps: what the accuracy gate sees of it (`meta`)."""

    meta: dict


LOCAL = -1  # a run whose actor died: the driver reads and folds it itself


class LiveFold:
    """The campaign's fold spread over `actors` FoldActors (`[resources] fold_actors`), seen from the
    driver. It stands where the driver's Aggregator stood for the accuracy gate (`add`, `folded`,
    `run_info`): a `Verified` run is folded by the actor that verified it, anything else by the
    driver's Aggregator. `merge` brings the actors' shares into that Aggregator."""

    def __init__(self, ray, campaign, agg, actors: int, say: Callable[[str], None], start_seconds: float = 300.0):
        self.ray, self.c, self.agg, self.say = ray, campaign, agg, say
        remote = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(FoldActor)
        self.actors = [remote.options(name=f"longtail:{campaign.name}:fold-{k}").remote(str(campaign.paths.root), True)
                       for k in range(actors)]
        from orchestrator.campaign import CampaignError

        pings = [a.ping.remote() for a in self.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=start_seconds)
        if len(ready) < len(pings):
            self.shutdown()
            cpus = ray.cluster_resources().get("CPU", 0)
            raise CampaignError(f"{len(pings) - len(ready)} of [resources] fold_actors = {actors} fold actors did not "
                                f"start within {start_seconds:.0f} s, expected one free CPU each (the cluster has "
                                f"{cpus:g} CPUs); lower fold_actors or add CPU nodes, then: longtail resume "
                                f"{campaign.paths.root}")
        try:
            self.nodes = len(set(ray.get(pings)))
        except Exception as e:  # the constructor failed: most often, that node cannot see the campaign directory
            self.shutdown()
            cause = getattr(e, "cause", None) or e
            why = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise CampaignError(f"a fold actor could not open {campaign.paths.root} on its node ({why}); fold actors "
                                f"need the campaign directory at the same path or URI on every node, as the "
                                f"workers do. Fix that or set [resources] fold_actors = 0, then: longtail resume "
                                f"{campaign.paths.root}") from None
        self.dead: set[int] = set()
        self.owner: dict[int, int] = {}  # run -> its actor (or LOCAL), until the run is merged or dropped
        self.acc: dict[int, float] = {}  # runs told to fold, not yet merged -> their test accuracy
        self.local: dict[int, object] = {}  # LOCAL runs' verified data, until the gate decides
        self.context: dict[int, object] = {}  # what the caller gave with each run, until it is verified
        self.to_verify: list[list[int]] = [[] for _ in self.actors]
        self.orders: list[tuple[list[int], list[int]]] = [([], []) for _ in self.actors]  # (fold, drop)
        self.verifying: dict = {}  # ref -> (actor, runs)
        self.to_verify_here: list[int] = []  # runs handed out when no actor was left
        self._next = 0
        self.seconds = {"merge": 0.0}

    # --- what the accuracy gate sees --------------------------------------------------------------

    @property
    def folded(self):
        f = self.agg.folded.copy()
        f[list(self.acc)] = True
        return f

    @property
    def run_info(self) -> dict:
        acc = self.agg.run_info["test_acc"].copy()
        acc[list(self.acc)] = list(self.acc.values())
        return {"test_acc": acc}

    def add(self, run: int, data) -> bool:
        """Fold `run`: in its actor if it is a Verified one there, else here."""
        if not isinstance(data, Verified):
            return self.agg.add(run, data)
        a = self.owner.get(run, LOCAL)
        if a == LOCAL or a in self.dead:
            self.owner.pop(run, None)
            data = self.local.pop(run, None) or self._read_here(run)
            return data is not None and self.agg.add(run, data)
        self.orders[a][0].append(run)
        self.acc[run] = float(data.meta.get("test_acc", float("nan")))
        return True

    def drop(self, run: int) -> None:
        """The gate refused `run`: its actor forgets it."""
        a = self.owner.pop(run, None)
        self.local.pop(run, None)
        if a is not None and a != LOCAL and a not in self.dead:
            self.orders[a][1].append(run)

    # --- the runs ---------------------------------------------------------------------------------

    def submit(self, run: int, context=None) -> bool:
        """Hand a finished run to an actor to verify; False if it is already folded or handed out."""
        if self.agg.is_known(run) or run in self.owner:
            return False
        live = [a for a in range(len(self.actors)) if a not in self.dead]
        a = live[self._next % len(live)] if live else LOCAL
        self._next += 1
        self.owner[run], self.context[run] = a, context
        if a == LOCAL:
            self.to_verify_here.append(run)
        else:
            self.to_verify[a].append(run)
        return True

    def send(self) -> None:
        """Send the queued verifications and fold orders (one call per actor)."""
        for a, runs in enumerate(self.to_verify):
            if runs:
                self.verifying[self.actors[a].verify.remote(runs)] = (a, runs)
                self.to_verify[a] = []
        for a, (fold, drop) in enumerate(self.orders):
            if fold or drop:
                self.actors[a].fold.remote(fold, drop)  # in order before any later call; errors surface at take
                self.orders[a] = ([], [])

    def verified(self, wait: bool = False) -> list[tuple[int, float, str, object]]:
        """(run, test accuracy, why it failed or "", its context) of each run verified since the last call;
        wait=True: of every run handed out."""
        from ray.exceptions import RayActorError

        self.send()
        out = [self._verify_here(run) for run in self.to_verify_here]
        self.to_verify_here = []
        while self.verifying:
            ready, _ = self.ray.wait(list(self.verifying), num_returns=len(self.verifying),
                                     timeout=None if wait else 0)
            for ref in ready:
                a, runs = self.verifying.pop(ref)
                try:
                    got = self.ray.get(ref)
                except RayActorError:
                    self._lost(a)
                    out += [self._verify_here(r) for r in runs]
                    continue
                for r, acc, error in got:
                    out.append((r, acc, error, self.context.pop(r, None)))
                    if error:
                        self.owner.pop(r, None)
            if not wait:
                break
        return out

    def merge(self) -> int:
        """Take every actor's share and merge it into the driver's Aggregator; returns the runs merged."""
        from ray.exceptions import RayActorError

        start = time.monotonic()
        self.send()
        live = [a for a in range(len(self.actors)) if a not in self.dead]
        refs = {a: self.actors[a].take.remote() for a in live}
        merged = 0
        for a, ref in refs.items():
            try:
                part = self.ray.get(ref)
            except RayActorError:
                self._lost(a)
                continue
            merged += self.agg.merge(part)
            for r in part["runs"].tolist():
                self.acc.pop(r, None)
                self.owner.pop(r, None)
        # told to fold and in no share: its actor died (or failed to fold it); every call before take ran
        for r in list(self.acc):
            if self.owner.get(r) not in self.dead:
                self.say(f"fold actor {self.owner.get(r)} did not fold run {r}; the driver folds it")
            self.acc.pop(r)
            self.owner.pop(r, None)
            data = self._read_here(r)
            if data is not None:
                merged += self.agg.add(r, data)
        self.seconds["merge"] += time.monotonic() - start
        return merged

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        self.dead = set(range(len(self.actors)))

    # --- an actor that died -----------------------------------------------------------------------

    def _lost(self, a: int) -> None:
        if a not in self.dead:
            self.dead.add(a)
            left = len(self.actors) - len(self.dead)
            self.say(f"fold actor {a} died; its runs not yet merged are read and folded again "
                     + (f"by the {left} other fold actors and the driver" if left else "by the driver"))

    def _read_here(self, run: int):
        from workers.shard import ShardError

        try:
            return self.agg.read(run)
        except ShardError as e:  # changed since its actor verified it: the next driver's refold rejects it
            self.say(f"the shard of run {run} no longer verifies ({e}); it is left unfolded")
            return None

    def _verify_here(self, run: int) -> tuple[int, float, str, object]:
        from workers.shard import ShardError

        self.owner[run] = LOCAL
        try:
            data = self.agg.read(run)
        except ShardError as e:
            self.owner.pop(run, None)
            return run, float("nan"), str(e), self.context.pop(run, None)
        self.local[run] = data
        return run, float(data.meta.get("test_acc", float("nan"))), "", self.context.pop(run, None)


def start_live_fold(campaign, agg, actors: int, say: Callable[[str], None]) -> LiveFold | None:
    """`[resources] fold_actors` fold actors on the Ray cluster this process is connected to; None (the
    driver folds) when it is connected to none (workers in this process)."""
    import ray

    if not ray.is_initialized():
        say(f"[resources] fold_actors = {actors} is ignored: this campaign runs without a Ray cluster; the driver "
            f"folds every shard")
        return None
    live = LiveFold(ray, campaign, agg, actors, say)
    say(f"{actors} fold actors on {live.nodes} nodes read, verify and fold the shards; the driver merges their "
        f"sums at every checkpoint")
    return live


def _interleave(per_actor: list[list]) -> list[tuple[int, list]]:
    out = []
    for i in range(max((len(b) for b in per_actor), default=0)):
        out += [(a, b[i]) for a, b in enumerate(per_actor) if i < len(b)]
    return out
