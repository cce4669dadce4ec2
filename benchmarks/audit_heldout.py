"""Item 3 of issue 15: audit a campaign's last K runs as targets (each taken out of the fit) and print the
online and offline likelihood-ratio attacks beside the loss-threshold baseline, with their ratios.

    python benchmarks/audit_heldout.py CAMPAIGN_DIR [--targets 20] [--variance auto] [--shadow K]

Prints a Markdown table for docs/audit.md; results recorded there with the command that made them.
"""

from __future__ import annotations

import argparse
import time

from estimators import privacy as pv
from orchestrator.features.audit import ATTACKS, FPRS, evaluate, load_target, open_for_audit, score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("campaign")
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--variance", choices=["auto", "global", "per-example"], default="auto")
    ap.add_argument("--shadow", type=int, default=0,
                    help="fit on only the first SHADOW runs that are not targets (few-runs campaigns)")
    args = ap.parse_args()
    start = time.perf_counter()
    agg = open_for_audit(args.campaign)
    runs = sorted(agg.folded_runs())[-args.targets:]
    gv = {"auto": "auto", "global": True, "per-example": False}[args.variance]
    targets = [load_target(agg, str(agg.c.paths.shard(r))) for r in runs]
    shadow = int(agg.risk.count_in[0] + agg.risk.count_out[0]) - 1
    if args.shadow:  # refit from a few runs that are not targets: nothing then needs taking out
        agg.risk = pv.zeros(agg.c.n_train)
        for r in [r for r in sorted(agg.folded_runs()) if r not in runs][:args.shadow]:
            d = agg.read(r)
            pv.fold_scores(agg.risk, d.mask[None], agg.risk_statistic(d)[None])
        for t in targets:
            t.run = None
        shadow = args.shadow
    results = [score(agg, t, gv) for t in targets]
    m = evaluate(results)
    print(f"campaign {agg.c.name!r}: {len(runs)} targets (runs {runs[0]}..{runs[-1]}), {shadow} shadow runs each, "
          f"statistic {agg.risk_source}, {'global' if results[0].fits.global_variance else 'per-example'} variance; "
          f"{m['members']} member and {m['non_members']} non-member scores; {time.perf_counter() - start:.1f} s")
    print("\n| attack | ROC AUC | " + " | ".join(f"TPR at {f:.1%} FPR" for f in FPRS) + " |")
    print("|---|---|" + "---|" * len(FPRS))
    for name in ATTACKS:
        print(f"| {name} | {m[name]['auc']:.3f} | " + " | ".join(f"{m[name][f'tpr_at_fpr_{f:g}']:.3f}" for f in FPRS)
              + " |")
    base = m["threshold"]
    for name in ("online", "offline"):
        ratios = ", ".join(f"{m[name][f'tpr_at_fpr_{f:g}'] / base[f'tpr_at_fpr_{f:g}']:.1f}x at {f:.1%}"
                           if base[f"tpr_at_fpr_{f:g}"] > 0 else f"baseline 0 at {f:.1%}" for f in FPRS)
        print(f"\n{name} / threshold TPR: {ratios}")


if __name__ == "__main__":
    main()
