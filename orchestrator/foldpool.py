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
"""

from __future__ import annotations

from typing import Iterator


class FoldActor:
    """Reads and verifies shards of one campaign against its plan and spec."""

    def __init__(self, root: str):
        from orchestrator.fold import Aggregator
        from orchestrator.campaign import create_or_open

        self.agg = Aggregator(create_or_open(None, root, load_data=False), from_scratch=True)

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


def _interleave(per_actor: list[list]) -> list[tuple[int, list]]:
    out = []
    for i in range(max((len(b) for b in per_actor), default=0)):
        out += [(a, b[i]) for a, b in enumerate(per_actor) if i < len(b)]
    return out
