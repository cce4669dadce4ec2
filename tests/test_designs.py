"""Subset designs and several subset ratios in one plan."""

import numpy as np
import pytest

from orchestrator import plan as planning


def test_bernoulli_keeps_each_example_with_probability_ratio():
    p = planning.make_plan("bernoulli", 1, 300, 0.3, 400)
    dense = p.dense()
    share = dense.mean(axis=0)
    assert np.abs(share - 0.3).max() < 5 * np.sqrt(0.3 * 0.7 / 400)
    assert dense.sum(axis=1).std() > 0  # sizes vary, unlike the fixed design
    np.testing.assert_array_equal(planning.make_plan("bernoulli", 1, 300, 0.3, 10).masks, p.masks[:10])


def test_balanced_puts_every_example_in_exactly_round_p_t_runs():
    p = planning.make_plan("balanced", 2, 97, 0.7, 30)
    counts = p.dense().sum(axis=0)
    assert (counts == 21).all()
    assert len({row.tobytes() for row in p.dense()}) == 30
    with pytest.raises(planning.PlanError, match="cannot grow"):
        planning.extend_plan(p, 40)
    with pytest.raises(planning.PlanError, match=r"round\(0.99 x 10\) = 10 of the 10 runs"):
        planning.make_plan("balanced", 0, 10, 0.99, 10)


def test_paired_runs_are_complements():
    p = planning.make_plan("paired", 3, 51, 0.5, 20)
    d = p.dense()
    for k in range(10):
        np.testing.assert_array_equal(d[2 * k + 1], ~d[2 * k])
    assert (d[0::2].sum(axis=1) == round(0.5 * 51)).all()
    with pytest.raises(planning.PlanError, match="multiple of 2"):
        planning.make_plan("paired", 3, 51, 0.5, 21)


def test_several_ratios_take_turns():
    p = planning.make_plan("fixed", 0, 100, [0.2, 0.5, 0.8], 12)
    assert p.ratio_of_run.tolist() == [0, 1, 2] * 4
    np.testing.assert_array_equal(p.subset_sizes(), [20, 50, 80] * 4)
    q = planning.make_plan("paired", 0, 100, [0.2, 0.5], 8)
    assert q.ratio_of_run.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    b = planning.make_plan("balanced", 0, 100, [0.2, 0.5], 20)
    for k, c in ((0, 2), (1, 5)):
        assert (b.dense(b.runs_of_ratio(k)).sum(axis=0) == c).all()


def test_columns_read_packed_bits():
    p = planning.make_plan("fixed", 5, 77, 0.4, 9)
    idx = np.array([0, 7, 8, 76, 33, 33])
    runs = np.array([8, 0, 3])
    np.testing.assert_array_equal(p.columns(runs, idx), p.dense()[runs][:, idx])


def test_columns_of_a_contiguous_range():
    p = planning.make_plan("bernoulli", 5, 77, 0.4, 9)
    for a, b in ((0, 77), (3, 20), (8, 16), (70, 77)):
        np.testing.assert_array_equal(p.columns(np.arange(9), np.arange(a, b)), p.dense()[:, a:b])


@pytest.mark.parametrize("design", ["fixed", "bernoulli", "balanced", "paired"])
def test_a_packed_runs_output_does_not_depend_on_its_pack_mates(design):
    """A crash regroups runs (a retried run trains alone, a resumed campaign packs what is left), so a
    run's shard must be the same bit for bit whichever runs share its call: here run k trained in a call
    of 16, of 4 and alone. Uneven subsets (all designs but fixed) once moved margins by ~1e-6."""
    import torch

    from workers.datasets import load_dataset
    from workers.ensemble import train_runs
    from workers.training import DeviceData

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker with cpus_per_worker = 1
    try:
        d = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
        dd = DeviceData.from_dataset(d, torch.device("cpu"))
        p = planning.make_plan(design, 4, d.n_train, 0.7, 16)
        subsets = [np.flatnonzero(row) for row in p.dense()]
        if design != "fixed":
            assert len({len(s) for s in subsets}) > 1  # uneven, the case that used to differ
        train = dict(epochs=2, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, schedule="cosine", label_smoothing=0.0, eval_batch_size=512)
        seeds = [int(s) for s in p.seeds]
        full = train_runs({"hidden": [16]}, dd, subsets, seeds, train)
        for pick in ([3, 0, 9, 14], [11]):
            part = train_runs({"hidden": [16]}, dd, [subsets[i] for i in pick], [seeds[i] for i in pick], train)
            for i, out in zip(pick, part):
                for split in ("train", "test"):
                    for key in ("margin", "probability"):
                        a, b = getattr(full[i], f"{split}_values")[key], getattr(out, f"{split}_values")[key]
                        assert a.tobytes() == b.tobytes(), (design, pick, i, split, key, np.abs(a - b).max())
                assert full[i].final_loss == out.final_loss
    finally:
        torch.set_num_threads(threads)


def test_a_run_alone_in_a_call_gets_the_shard_it_gets_in_a_pack(tmp_path):
    """The worker trains a call of one MLP run (a retried run runs alone) with the same vectorized
    trainer as a pack, so its shard is the one the pack gives, bit for bit."""
    from orchestrator import spec as specs
    from orchestrator.campaign import create_or_open
    from workers.shard import read_shard
    from workers.worker import RunWorker

    text = ('[campaign]\nname = "alone"\nruns = 4\ndesign = "bernoulli"\n[dataset]\nname = "digits"\n'
            '[model]\nname = "mlp"\nhidden = [16]\n[train]\nepochs = 2\n')
    c = create_or_open(specs.loads(text, "s.toml"), tmp_path / "c")
    worker = RunWorker(c.spec.to_dict(), c.name, c.spec.result_hash(), c.fingerprint, 1, False)
    calls = [(r, c.plan.masks[r], int(c.plan.seeds[r]), str(tmp_path / f"{k}-{r}.parquet"))
             for k in ("pack", "alone") for r in range(4)]
    worker.run_many(calls[:4])
    worker.run_many([calls[4 + 2]])
    a, b = (read_shard(tmp_path / f"{k}-2.parquet", campaign="alone", spec_hash=c.spec.result_hash(), run=2,
                       n_train=c.n_train, n_test=c.n_test) for k in ("pack", "alone"))
    for split in ("train_values", "test_values"):
        assert getattr(a, split)["margin"].tobytes() == getattr(b, split)["margin"].tobytes(), split
