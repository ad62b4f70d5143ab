"""The `navit-clip compare` sub-command: its options and its handler (the work is in compare/run.py)."""

from __future__ import annotations

import argparse


def compare_command(shards: str | None, eval_shards: str | None, steps: int | None, seeds: str, recipes: str,
                    out: str, budgets: str | None = None, checkpoints: int = 4, jobs: int = 1,
                    changes: list[str] | None = None, flops: float | None = None) -> dict:
    """Train the recipes on the same shards to the same budget and write the comparison."""
    from navit_clip.compare.run import compare, parse_settings

    result = compare(parse_settings(shards, eval_shards, steps, seeds, recipes, out, budgets, checkpoints, jobs, changes,
                                    flops))
    print(f"compare: {result['ran']} of {result['jobs']} jobs run now, the rest were recorded as finished")
    for what, path in result["written"].items():
        print(f"  {what:<14} -> {path}")
    return result


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train NaViT, square-ViT and open_clip_train recipes on the same shards "
                                       "at equal compute; zero-shot table, CSV and plots")
    p.add_argument("--shards", default=None, help="training shards (default: data.train_shards of configs/compare/navit.yaml)")
    p.add_argument("--eval-shards", default=None, help="zero-shot shards with dataset.json (default: data.eval_shards)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default 1000)")
    p.add_argument("--flops", type=float, default=None,
                   help="training FLOPs of every run instead: each recipe trains the steps that spend them "
                        "(e.g. 1.2e13), its checkpoints at equal fractions of them")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per recipe and seed")
    p.add_argument("--recipes", default="navit,square,open_clip", help="comma-separated: navit, square, open_clip")
    p.add_argument("--out", default="runs/compare", help="runs, state.json, table.md, results.csv and plots")
    p.add_argument("--budgets", default=None, help="inference tokens per image for the final models "
                                                   "(default: 1/4x to 2x the training budget)")
    p.add_argument("--checkpoints", type=int, default=4, help="evaluations during training, at equal fractions")
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (each in its own process, with "
                                                        "cores / jobs threads unless OMP_NUM_THREADS is set)")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                   help="change one recipe's config key for this comparison (repeatable), e.g. "
                        "navit:optim.lr=0.002")
    p.set_defaults(handler=compare_command)
