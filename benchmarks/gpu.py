"""The GPU benchmark: three measurements, each a ratio of two ways measured side by side, in one call.

    bash benchmarks/gpu.sh                # on one GPU: a few minutes
    bash benchmarks/gpu.sh --dry-run      # any machine, CPU only, tiny sizes, seconds (what tests run)
    bash benchmarks/gpu.sh --only a,c --epochs 2 --json out.json

(a) time per model of the fast CIFAR recipe (workers/recipes/cifar_airbench.py: airbench net,
    bf16, channels_last, torch.compile) against its single-model baseline (the same recipe in fp32,
    NCHW, eager), with the two steps in between, on 70% subsets of a CIFAR-10-shaped synthetic
    dataset generated on the device (no downloads), for a few epochs. Every configuration first
    trains one untimed run (cuDNN autotuning, and compilation where compile is on: reported as
    "first run"), then `--runs` timed runs on other subsets and seeds. Times are train_run's, what
    a worker spends per run: the training loop, then the evaluation of all 60,000 examples.
(b) packing: K runs one after the other in this process against K runs at once in K processes
    sharing the GPU (what [resources] gpus_per_worker = 1/K does: K Ray workers on one GPU). Each
    process builds its data and trains one untimed run first; then all start together and the wall
    time until the last one finishes is compared with K sequential runs. Eager bf16 + channels_last
    (compiling in K processes would take K compilations).
(c) the influence GEMM of a CIFAR-100-sized campaign, A = M^T C with M the (4,000 runs x 50,000)
    0/1 masks and C the (4,000 x 10,000) 0/1 test correctness: TFLOP/s (2 n t n_test / time) of each
    way to compute the counts, and whether the counts are exact: compared, on the first rows, with a
    float64 product. bf16 products are exact only with fp32 accumulation *and* output
    (torch.mm(..., out_dtype=torch.float32), CUDA only); a bf16 output rounds counts above 256;
    int8 -> int32 (torch._int_mm) is exact.

(d) every built-in recipe (workers/recipes/) with its own model and [train] (bf16, channels_last,
    compile as the recipe says), one epoch on the same synthetic data: seconds per run (the
    per-epoch time scaled to the recipe's epochs) and test accuracy.
(e) packed convnets (workers/packed.py): K = 1, 4, 16 runs of "cnn" and of the airbench net in one
    fused model against K train_run calls; compare with (b), the fractional-GPU way.
(f) a short campaign end to end (driver, Ray workers on fractions of the GPU, shards, estimates):
    runs per second.
At the end a summary table in Markdown, ready for docs/performance.md.

--dry-run runs every step on the CPU at tiny sizes (the report has the same form; its times say
nothing about a GPU). On the CPU, compile uses Dynamo's "eager" backend in this process and
"aot_eager" in (f)'s workers (inductor would compile C++ for minutes), and the ResNet recipes in (d)
run eagerly in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIZES = {
    # n: training examples, side: image side, epochs/runs per configuration, k: packed runs,
    # gemm: (n_train, runs t, n_test), check_rows: rows of A compared with float64
    "full": dict(n_train=50_000, n_test=10_000, side=32, classes=10, epochs=4, runs=3, k=4,
                 gemm=(50_000, 4_000, 10_000), check_rows=4096, repeats=5, model=None, batch=None,
                 recipe_epochs=1, dry=False, pack_ks=(1, 4, 16), campaign_runs=64, campaign_workers=4,
                 campaign_epochs=5,
                 recipe_data=None),
    "dry": dict(n_train=512, n_test=128, side=16, classes=10, epochs=1, runs=2, k=2,
                gemm=(640, 1_000, 256), check_rows=640, repeats=2,
                model={"widths": [8, 16, 16], "stem_channels": 8}, batch=128,
                recipe_epochs=1, dry=True, pack_ks=(1, 2), campaign_runs=4, campaign_workers=2,
                campaign_epochs=1,
                # (d) in a dry run: 12-pixel images (the airbench net needs 9), one run per recipe
                recipe_data=dict(n_train=64, n_test=32, side=12, classes=10)),
}
RATIO = 0.7  # the paper's subset ratio


# --------------------------------------------------------------------------------------------------
#  Setup shared by (a) and (b)
# --------------------------------------------------------------------------------------------------

def synthetic_cifar(cfg: dict, device: torch.device, seed: int = 0):
    """A CIFAR-10-shaped dataset made on the device: each class a smooth random template (8x8 noise
    upsampled), each image its class's template plus pixel noise, standardised. Learnable, not trivial."""
    from workers.training import DeviceData

    g = torch.Generator(device=device).manual_seed(seed)
    side, k = cfg["side"], cfg["classes"]
    templates = F.interpolate(torch.randn(k, 3, 8, 8, generator=g, device=device), size=(side, side),
                              mode="bilinear", align_corners=False)

    def split(n: int):
        y = torch.randint(0, k, (n,), generator=g, device=device)
        x = templates[y] + 2.0 * torch.randn(n, 3, side, side, generator=g, device=device)
        return (x - x.mean()) / x.std(), y

    x_train, y_train = split(cfg["n_train"])
    x_test, y_test = split(cfg["n_test"])
    return DeviceData(x_train, y_train, x_test, y_test, k, (3, side, side))


def recipe(cfg: dict) -> tuple[dict, dict]:
    """The cifar10-airbench recipe's [model] and resolved [train] (all keys), shortened to cfg's epochs."""
    from orchestrator.spec import TrainSection, parse_section
    from workers.recipes import recipe_sections

    sections = recipe_sections("cifar10-airbench")
    model = {**sections["model"], **(cfg["model"] or {})}
    raw = dict(sections["train"])
    # keep the recipe's warm-up share (2.3 of 10 epochs) at the shorter length
    raw["warmup_epochs"] = raw["warmup_epochs"] * cfg["epochs"] / raw["epochs"]
    raw["epochs"] = cfg["epochs"]
    if cfg["batch"]:
        raw["batch_size"] = cfg["batch"]
    return model, dataclasses.asdict(parse_section(TrainSection, raw, "[train] of recipe cifar10-airbench"))


def subset(n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, 7]).choice(n, round(RATIO * n), replace=False))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(build, data, seed: int, train: dict) -> tuple[float, float, float]:
    """(wall seconds of train_run, its training-loop seconds, test accuracy) of one run."""
    from workers.training import train_run

    sync(data.x_train.device)
    start = time.perf_counter()
    out = train_run(build, data, subset(len(data.y_train), seed), seed, train)
    wall = time.perf_counter() - start
    acc = float((out.test_pred == data.y_test.cpu().numpy()).mean())
    return wall, out.train_seconds, acc


# --------------------------------------------------------------------------------------------------
#  (a) fast recipe vs baseline, time per model
# --------------------------------------------------------------------------------------------------

CONFIGS = [  # (label, overrides of the recipe's [train]); the first is the baseline
    ("baseline  fp32, NCHW, eager", dict(precision="fp32", channels_last=False, compile=False)),
    ("          bf16, NCHW, eager", dict(precision="bf16", channels_last=False, compile=False)),
    ("          bf16, NHWC, eager", dict(precision="bf16", channels_last=True, compile=False)),
    ("fast      bf16, NHWC, compiled", dict(precision="bf16", channels_last=True, compile=True)),
]


def section_a(cfg: dict, device: torch.device, data, out: dict) -> None:
    from workers.models import model_factory

    model, train = recipe(cfg)
    build = model_factory({"name": "airbench", **model})
    m = round(RATIO * cfg["n_train"])
    print(f"== (a) fast CIFAR recipe vs its baseline: airbench net, {m:,} of {cfg['n_train']:,} synthetic "
          f"{cfg['side']}x{cfg['side']} images per run, {train['epochs']} epochs, batch {train['batch_size']}, "
          f"then all {cfg['n_train'] + cfg['n_test']:,} examples evaluated")
    print(f"   {'configuration':<31} {'first run':>10} {'per model':>10} {'train loop':>11} {'test acc':>9} "
          f"{'speed-up':>9}")
    rows = []
    for label, over in CONFIGS:
        t = {**train, **over}
        first = timed_run(build, data, 1000, t)  # cuDNN autotuning, compilation
        runs = [timed_run(build, data, seed, t) for seed in range(cfg["runs"])]
        wall = statistics.median(r[0] for r in runs)
        loop = statistics.median(r[1] for r in runs)
        acc = statistics.mean(r[2] for r in runs)
        rows.append(dict(config=" ".join(label.split()), overrides=over,
                         first_run_s=first[0], per_model_s=wall, train_loop_s=loop, test_acc=acc,
                         runs=[r[0] for r in runs]))
        speedup = rows[0]["per_model_s"] / wall
        print(f"   {label:<31} {first[0]:>9.2f}s {wall:>9.3f}s {loop:>10.3f}s {acc:>9.3f} {speedup:>8.2f}x")
    base, fast = rows[0], rows[-1]
    ratio = base["per_model_s"] / fast["per_model_s"]
    print(f"   ratio (a): baseline / fast time per model = {base['per_model_s']:.3f} s / {fast['per_model_s']:.3f} s "
          f"= {ratio:.2f}x (training loop alone {base['train_loop_s'] / fast['train_loop_s']:.2f}x); "
          f"compiling costs {max(0.0, fast['first_run_s'] - fast['per_model_s']):.1f} s once per worker; "
          f"median of {cfg['runs']} runs each")
    out["a"] = dict(rows=rows, ratio=ratio)


# --------------------------------------------------------------------------------------------------
#  (b) K runs sequentially vs K processes sharing the device
# --------------------------------------------------------------------------------------------------

PACK_OVERRIDES = dict(precision="bf16", channels_last=True, compile=False)


def _pack_child(rank: int, cfg: dict, device_name: str, start, results) -> None:
    """One of K processes: build the data, train one untimed run, say it is ready, wait for the start
    signal, train one timed run. Every failure is reported to the parent, never swallowed."""
    try:
        from workers.models import model_factory

        device = torch.device(device_name)
        if device.type == "cpu":
            torch.set_num_threads(1)
        data = synthetic_cifar(cfg, device)
        model, train = recipe(cfg)
        train = {**train, **PACK_OVERRIDES}
        build = model_factory({"name": "airbench", **model})
        timed_run(build, data, 2000 + rank, train)  # warm-up: cuDNN autotuning, allocator
        results.put(("ready", rank))
        start.wait()
        wall, _, acc = timed_run(build, data, rank, train)
        results.put(("done", rank, wall, acc))
    except BaseException:  # noqa: BLE001
        results.put(("error", rank, traceback.format_exc()))


def _collect(results, procs, n: int, timeout: float) -> dict:
    """n messages from the children, by rank; fails fast when one reports an error or dies silently."""
    import queue

    got: dict = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            msg = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a packed process exited with code {dead[0].exitcode} without reporting "
                                   f"(out of memory?)") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"packed processes did not report within {timeout:.0f} s") from None
            continue
        if msg[0] == "error":
            raise RuntimeError(f"packed process {msg[1]} failed:\n{msg[2]}")
        got[msg[1]] = msg
    return got


def section_b(cfg: dict, device: torch.device, data, out: dict) -> None:
    import multiprocessing as mp

    from workers.models import model_factory

    k = cfg["k"]
    model, train = recipe(cfg)
    train = {**train, **PACK_OVERRIDES}
    build = model_factory({"name": "airbench", **model})
    print(f"== (b) packing: {k} runs one after the other in one process vs {k} processes sharing the "
          f"{device.type.upper()} (eager bf16 + channels_last, {train['epochs']} epochs each)")
    timed_run(build, data, 2000, train)  # warm-up, as each child does
    sync(device)
    t0 = time.perf_counter()
    seq = [timed_run(build, data, r, train) for r in range(k)]
    seq_wall = time.perf_counter() - t0

    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_pack_child, args=(r, cfg, str(device), start, results), daemon=True)
             for r in range(k)]
    for p in procs:
        p.start()
    timeout = 600 if device.type == "cuda" else 300
    try:
        _collect(results, procs, k, timeout)  # all built their data and trained their warm-up run
        t0 = time.perf_counter()
        start.set()
        got = list(_collect(results, procs, k, timeout).values())
        par_wall = time.perf_counter() - t0
    finally:
        for p in procs:  # ours only, and only those still running after a failure
            if p.is_alive():
                p.join(timeout=30 if not start.is_set() else 60)
            if p.is_alive():
                p.terminate()
    ratio = seq_wall / par_wall
    print(f"   {k} sequential runs          {seq_wall:>8.2f} s   ({seq_wall / k:.3f} s per run, "
          f"test acc {statistics.mean(s[2] for s in seq):.3f})")
    print(f"   {k} concurrent processes     {par_wall:>8.2f} s   (each run {min(g[2] for g in got):.3f}-"
          f"{max(g[2] for g in got):.3f} s, test acc {statistics.mean(g[3] for g in got):.3f})")
    print(f"   ratio (b): throughput of {k} processes / sequential = {seq_wall:.2f} s / {par_wall:.2f} s = "
          f"{ratio:.2f}x (1.0 = no gain from sharing; {k:.1f} = perfect)")
    out["b"] = dict(k=k, sequential_s=seq_wall, concurrent_s=par_wall, ratio=ratio,
                    concurrent_runs_s=[g[2] for g in got])


# --------------------------------------------------------------------------------------------------
#  (c) the influence GEMM
# --------------------------------------------------------------------------------------------------

def _time(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up: cuBLAS handles and heuristics
    times = []
    for _ in range(repeats):
        del result
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def section_c(cfg: dict, device: torch.device, out: dict) -> None:
    n, t, n_test = cfg["gemm"]
    rows = min(cfg["check_rows"], n)
    flop = 2 * n * t * n_test
    print(f"== (c) influence GEMM A = M^T C: M ({t:,} runs x {n:,} train) and C ({t:,} x {n_test:,} test) of 0/1, "
          f"{flop / 1e12:.2f} TFLOP per product; counts checked against float64 on the first {rows:,} rows")
    g = torch.Generator(device=device).manual_seed(0)
    mask = torch.rand(t, n, generator=g, device=device) < RATIO
    correct = torch.rand(t, n_test, generator=g, device=device) < 0.75
    reference = torch.mm(mask[:, :rows].t().double(), correct.double())  # exact: integers far below 2^53
    mb, cb = mask.to(torch.bfloat16), correct.to(torch.bfloat16)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 product (0/1 inputs would be exact in TF32 too)

    def int8():
        return torch._int_mm(mi, ci)

    mi = ci = None
    ways = [  # (key in the JSON, label, product)
        ("bf16-fp32", "bf16 in, fp32 out  torch.mm(out_dtype=float32)",
         lambda: torch.mm(mb.t(), cb, out_dtype=torch.float32)),
        ("int8-int32", "int8 in, int32 out torch._int_mm", int8),
        ("fp32", "fp32               torch.mm", lambda: torch.mm(mask.t().float(), correct.float())),
        ("bf16-bf16", "bf16 in, bf16 out  torch.mm (rounds above 256)", lambda: torch.mm(mb.t(), cb)),
    ]
    print(f"   {'way':<48} {'seconds':>9} {'TFLOP/s':>9}  counts")
    results = []
    try:
        for key, label, fn in ways:
            try:
                if fn is int8 and mi is None:
                    mi = mask.t().contiguous().to(torch.int8)  # (n, t): how a store would keep it for this GEMM
                    ci = correct.to(torch.int8)
                seconds, a = _time(fn, device, cfg["repeats"])
            except (RuntimeError, NotImplementedError, TypeError) as e:
                msg = f"{type(e).__name__}: {str(e).split('. ')[0].splitlines()[0][:100]}"
                print(f"   {label:<48} {'-':>9} {'-':>9}  not available on {device.type}: {msg}")
                results.append(dict(key=key, way=label, available=False, error=msg))
                continue
            err = float((a[:rows].double() - reference).abs().max())
            del a
            verdict = "exact" if err == 0 else f"INEXACT (max error {err:g})"
            print(f"   {label:<48} {seconds:>9.4f} {flop / seconds / 1e12:>9.1f}  {verdict}")
            results.append(dict(key=key, way=label, available=True, seconds=seconds, tflops=flop / seconds / 1e12,
                                max_error=err))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    exact = [r for r in results if r.get("available") and r["max_error"] == 0]
    fp32 = next((r for r in results if r["key"] == "fp32" and r["available"]), None)
    if exact:
        best = max(exact, key=lambda r: r["tflops"])
        ratio = f" = {best['tflops'] / fp32['tflops']:.2f}x the fp32 product" if fp32 else ""
        print(f"   ratio (c): fastest exact way: {best['way'].split('  ')[0]}, {best['tflops']:.1f} TFLOP/s{ratio}")
    else:
        print("   ratio (c): no exact way ran")
    out["c"] = dict(shape=dict(n=n, t=t, n_test=n_test), ways=results)



# --------------------------------------------------------------------------------------------------
#  (d) every recipe: seconds per run and accuracy on the CIFAR-shaped data
# --------------------------------------------------------------------------------------------------

def recipe_train(name: str, cfg: dict) -> tuple[dict, dict]:
    """Recipe `name`'s [model] and resolved [train], cut to cfg["recipe_epochs"] epochs (warm-up share kept)."""
    from orchestrator.spec import TrainSection, parse_section
    from workers.recipes import recipe_sections

    sections = recipe_sections(name)
    raw = dict(sections["train"])
    if "warmup_epochs" in raw:
        raw["warmup_epochs"] = raw["warmup_epochs"] * cfg["recipe_epochs"] / raw["epochs"]
    full_epochs, raw["epochs"] = raw["epochs"], cfg["recipe_epochs"]
    if cfg["batch"]:
        raw["batch_size"] = min(raw["batch_size"], cfg["batch"])
    train = dataclasses.asdict(parse_section(TrainSection, raw, f"[train] of recipe {name}"))
    if cfg["dry"] and sections["model"]["name"].startswith("resnet"):
        # dry run: tracing a ResNet-50 takes minutes on a CPU, and bf16 autocast on a CPU without
        # native bf16 is emulated (several times slower than fp32)
        train.update(compile=False, precision="fp32")
    return sections["model"], dict(train, full_epochs=full_epochs)


def section_d(cfg: dict, device: torch.device, data, out: dict) -> None:
    from workers.models import model_factory
    from workers.recipes import recipe_names

    c = {**cfg, **(cfg["recipe_data"] or {})}
    print(f"== (d) every recipe, {cfg['recipe_epochs']} epoch(s) on {round(RATIO * c['n_train']):,} of the "
          f"{c['side']}x{c['side']} synthetic CIFAR-shaped images (its own model, precision, layout, compile), "
          f"then all {c['n_train'] + c['n_test']:,} evaluated; 'per full run' scales the per-epoch time to the "
          f"recipe's epochs")
    print(f"   {'recipe':<20} {'first run':>10} {'per run':>9} {'per epoch':>10} {'per full run':>13} {'test acc':>9}")
    rows = []
    if cfg["recipe_data"]:
        data = synthetic_cifar({**cfg, **cfg["recipe_data"]}, device)
    for name in recipe_names():
        model, train = recipe_train(name, cfg)
        full = train.pop("full_epochs")
        build = model_factory(model)
        first = timed_run(build, data, 3000, train)  # compilation, autotuning
        wall, loop, acc = timed_run(build, data, 0, train) if not cfg["recipe_data"] else first
        per_epoch = loop / train["epochs"]
        per_full = wall - loop + per_epoch * full
        rows.append(dict(recipe=name, first_run_s=first[0], per_run_s=wall, per_epoch_s=per_epoch,
                         per_full_run_s=per_full, full_epochs=full, test_acc=acc))
        print(f"   {name:<20} {first[0]:>9.2f}s {wall:>8.2f}s {per_epoch:>9.3f}s {per_full:>12.1f}s {acc:>9.3f}")
    out["d"] = dict(rows=rows)


# --------------------------------------------------------------------------------------------------
#  (e) packed convnets: K runs in one fused model against K runs one by one
# --------------------------------------------------------------------------------------------------

def section_e(cfg: dict, device: torch.device, data, out: dict) -> None:
    from workers.models import model_factory
    from workers.packed import train_packed

    model, train = recipe(cfg)
    train = {**train, "compile": False}  # packs are not compiled (workers/packed.py)
    nets = {"cnn": {"name": "cnn", "channels": [32, 64], "hidden": 128},
            "airbench": {"name": "airbench", **model}}
    if cfg["dry"]:
        train["precision"] = "fp32"  # emulated bf16 on a CPU: slow, and checked by (a) and (d) already
        nets.pop("airbench")  # tests/test_packed_cnn.py packs it; the dry run only checks that (e) runs
        nets["cnn"] = {"name": "cnn", "channels": [8, 16], "hidden": 16}
    print(f"== (e) packing convnets: K runs in one fused model (workers/packed.py) vs K train_run calls, "
          f"{train['epochs']} epoch(s) each, the airbench recipe's [train] in eager mode")
    print(f"   {'model':<9} {'K':>3} {'sequential':>11} {'packed':>9} {'speed-up':>9} {'acc seq':>8} "
          f"{'acc packed':>10}")
    rows = []
    for net, section in nets.items():
        build = model_factory(section)
        train_packed(build, data, [subset(cfg["n_train"], 4000)] * 2, [4000, 4001], train)  # warm-up
        for k in cfg["pack_ks"]:
            subs = [subset(cfg["n_train"], s) for s in range(k)]
            sync(device)
            t0 = time.perf_counter()
            seq = [timed_run(build, data, s, train)[2] for s in range(k)]
            seq_s = time.perf_counter() - t0
            sync(device)
            t0 = time.perf_counter()
            outs = train_packed(build, data, subs, list(range(k)), train)
            sync(device)
            pack_s = time.perf_counter() - t0
            acc = float(np.mean([(o.test_pred == data.y_test.cpu().numpy()).mean() for o in outs]))
            rows.append(dict(model=net, k=k, sequential_s=seq_s, packed_s=pack_s, ratio=seq_s / pack_s,
                             acc_sequential=float(np.mean(seq)), acc_packed=acc))
            print(f"   {net:<9} {k:>3} {seq_s:>10.2f}s {pack_s:>8.2f}s {seq_s / pack_s:>8.2f}x {np.mean(seq):>8.3f} "
                  f"{acc:>10.3f}")
    best = max(rows, key=lambda r: r["ratio"])
    print(f"   ratio (e): best packing speed-up {best['ratio']:.2f}x ({best['model']}, K = {best['k']}); "
          f"(b) gave {out.get('b', {}).get('ratio', float('nan')):.2f}x for {cfg['k']} processes sharing the device")
    out["e"] = dict(rows=rows)


# --------------------------------------------------------------------------------------------------
#  (f) a short campaign end to end: longtail's driver, Ray workers, shards, estimates
# --------------------------------------------------------------------------------------------------

def section_f(cfg: dict, device: torch.device, out: dict) -> None:
    import tempfile

    from orchestrator import spec as specs
    from orchestrator.campaign import create_or_open
    from orchestrator.driver import run_campaign

    gpus = 0.0 if device.type == "cpu" else 1.0 / cfg["campaign_workers"]
    text = f"""
[campaign]
name = "gpu-bench"
runs = {cfg['campaign_runs']}
seed = 0
[dataset]
name = "digits"
[model]
name = "cnn"
channels = [16, 32]
hidden = 64
[train]
epochs = {cfg['campaign_epochs']}
batch_size = 128
lr = 0.05
[resources]
workers = {cfg['campaign_workers']}
cpus_per_worker = 1
gpus_per_worker = {gpus}
local_cpus = {max(2, cfg['campaign_workers'])}
"""
    print(f"== (f) campaign end to end: {cfg['campaign_runs']} runs of 'cnn' on digits, "
          f"{cfg['campaign_epochs']} epochs, "
          f"{cfg['campaign_workers']} workers x {gpus:g} GPU (packing: its automatic value)")
    with tempfile.TemporaryDirectory(prefix="longtail-gpu-bench-") as tmp:
        c = create_or_open(specs.loads(text, "gpu-bench.toml"), Path(tmp) / "c")
        report = run_campaign(c, progress=False)
    if not report.complete:
        raise RuntimeError(f"the campaign did not complete: {report}")
    rate = report.trained / report.training_seconds
    print(f"   {report.trained} runs in {report.training_seconds:.1f} s of training ({report.seconds:.1f} s with Ray "
          f"start-up and estimates): {rate:.2f} runs/s")
    print(f"   ratio (f): {rate:.2f} runs/s end to end")
    out["f"] = dict(runs=report.trained, training_s=report.training_seconds, total_s=report.seconds, runs_per_s=rate)


def summary(out: dict) -> None:
    """The figures of this call as a Markdown table, ready for docs/performance.md."""
    rows = []
    if "a" in out:
        for r in out["a"]["rows"]:
            rows.append((f"(a) airbench recipe, {r['config']}",
                         f"{r['per_model_s']:.3f} s per run, acc {r['test_acc']:.3f}"))
        rows.append(("(a) fast / baseline", f"{out['a']['ratio']:.2f}x"))
    if "b" in out:
        rows.append((f"(b) {out['b']['k']} processes sharing the device", f"{out['b']['ratio']:.2f}x throughput"))
    if "c" in out:
        for w in out["c"]["ways"]:
            if w.get("available"):
                rows.append((f"(c) GEMM {w['way'].split('  ')[0]}", f"{w['tflops']:.1f} TFLOP/s, "
                             f"{'exact' if w['max_error'] == 0 else 'inexact'}"))
    if "d" in out:
        for r in out["d"]["rows"]:
            rows.append((f"(d) recipe {r['recipe']}", f"{r['per_full_run_s']:.1f} s per full run "
                         f"({r['full_epochs']} epochs, scaled), acc {r['test_acc']:.3f} after the short run"))
    if "e" in out:
        for r in out["e"]["rows"]:
            rows.append((f"(e) packed {r['model']}, K = {r['k']}", f"{r['ratio']:.2f}x vs sequential"))
    if "f" in out:
        rows.append(("(f) campaign end to end", f"{out['f']['runs_per_s']:.2f} runs/s ({out['f']['runs']} runs)"))
    print("== summary (Markdown, for docs/performance.md)")
    print("| measurement | result |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")

# --------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds: checks that every step runs")
    ap.add_argument("--only", default="a,b,c,d,e,f", help="sections to run, e.g. 'a,c' (default: all)")
    ap.add_argument("--epochs", type=int, help="epochs per run in (a) and (b) (default 4; dry run 1)")
    ap.add_argument("--runs", type=int, help="timed runs per configuration in (a) (default 3)")
    ap.add_argument("--k", type=int, help="packed runs / processes in (b) (default 4)")
    ap.add_argument("--json", help="also write the measurements to this file")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = dict(SIZES["dry" if a.dry_run else "full"])
    for key in ("epochs", "runs", "k"):
        if getattr(a, key):
            cfg[key] = getattr(a, key)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    if not only <= set("abcdef"):
        ap.error(f"--only takes sections from a, b, c, d, e, f; found {a.only!r}")

    if a.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("error: no CUDA device found (torch.cuda.is_available() is False); run with --dry-run to check the "
              "script on a CPU, or run it on a machine with a GPU", file=sys.stderr)
        return 2
    import workers.training as training

    if device.type == "cpu":
        training._COMPILE_BACKEND = "eager"  # Dynamo without inductor's C++ compilation: checks the path only
        os.environ["LONGTAIL_COMPILE_BACKEND"] = "aot_eager"  # the same for (f)'s Ray workers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"longtail GPU benchmark{' (DRY RUN: CPU, tiny sizes; times mean nothing)' if a.dry_run else ''}")
    print(f"device {device} ({name}); torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"cudnn.benchmark={torch.backends.cudnn.benchmark}, cudnn TF32={torch.backends.cudnn.allow_tf32}; "
          f"compile backend {training._COMPILE_BACKEND}")
    out: dict = {"device": str(device), "device_name": name, "torch": torch.__version__, "dry_run": a.dry_run,
                 "sizes": cfg}
    failed = []
    data = synthetic_cifar(cfg, device) if only & {"a", "b", "d", "e"} else None
    for key, fn, args in (("a", section_a, (cfg, device, data, out)), ("b", section_b, (cfg, device, data, out)),
                          ("c", section_c, (cfg, device, out)), ("d", section_d, (cfg, device, data, out)),
                          ("e", section_e, (cfg, device, data, out)), ("f", section_f, (cfg, device, out))):
        if key not in only:
            continue
        start = time.perf_counter()
        try:
            fn(*args)
        except Exception:  # report and go on: one broken section should not hide the others
            failed.append(key)
            print(f"   section ({key}) FAILED:\n" + traceback.format_exc())
        print(f"   ({key}) took {time.perf_counter() - start:.1f} s")
    summary(out)
    print(f"total {time.perf_counter() - t_start:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    if failed:
        print(f"failed sections: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
