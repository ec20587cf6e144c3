"""Click curves on the demo: zero-shot, trained single-shot, trained with correction clicks, side by side.

    python benchmarks/click_curves.py [--base sam|sam2] [--method dora] [--seeds 0 1 2] [--clicks 5]
        [--train-clicks 3] [--output runs/click-curves] [--markdown t.md] [--svg curves.svg] [--threads 1]
        [-- --train.epochs 6 ...]
    python benchmarks/click_curves.py --quick --json out.json   # 1 seed, 2 steps on tiny splits, 2 clicks

Per seed, two runs of the demo (``samtune/train.py`` with the default run's settings, ``benchmarks/method_table.py``
runs them) with the same first prompts (``data.prompt mixed``: box, point or both per step):

- ``single-shot``: one prompt per instance, today's training;
- ``clicks``: then ``--train-clicks`` correction rounds (``train.correction_clicks``; the previous mask as mask
  prompt half the time, and a last mask-only round).

Both select their checkpoint on the validation split's single-shot mIoU, as the demo does. Then the base and
each run's selected weights are scored on the held-out test split by ``samtune.evaluate --clicks K`` from two
first prompts: ``point`` (the interactive-segmentation protocol: a first click at the instance's centre, then
clicks in the errors; mIoU after each, NoC85 / NoC90) and ``box`` (the single-shot score is its first value).
Rows: mean and sample std over the seeds. Finished runs and scores are reused, so an interrupted benchmark
resumes where it stopped. --svg draws the point-protocol curves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
import method_table
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("zero-shot", "single-shot", "clicks")
PROTOCOLS = ("point", "box")


def train_args(variant: str, train_clicks: int) -> list[str]:
    """What a variant adds to the demo run (the first prompts are the same for both)."""
    args = ["--data.prompt", "mixed"]
    if variant == "clicks":
        args += ["--train.correction_clicks", str(train_clicks), "--train.mask_only_round", "true"]
    return args


def score(model: Path, adapter: Path | None, split: tuple[Path, Path], protocol: str, clicks: int, out: Path) -> dict:
    """``samtune.evaluate --clicks`` on the test split (reused when its JSON exists)."""
    if not out.exists():
        from samtune.evaluate import main as evaluate_main

        argv = ["--model", str(model), "--annotations", str(split[0]), "--images", str(split[1]), "--prompt",
                protocol, "--clicks", str(clicks), "--batch-size", "8", "--output", str(out)]  # fmt: skip
        evaluate_main(argv + (["--adapter", str(adapter)] if adapter else []))
    return json.loads(out.read_text())


def summarise(scores: list[dict]) -> list[dict]:
    """One row per (variant, protocol): the curve's mean and std per click count, NoC85 / NoC90 means."""
    rows = []
    for variant in VARIANTS:
        for protocol in PROTOCOLS:
            mine = [s for s in scores if s["variant"] == variant and s["protocol"] == protocol]
            if not mine:
                continue
            curves = np.array([s["clicks"]["mIoU"] for s in mine])
            row = {"variant": variant, "protocol": protocol, "seeds": len(mine)}
            row["mIoU_mean"] = curves.mean(0).tolist()
            row["mIoU_std"] = (curves.std(0, ddof=1) if len(mine) > 1 else np.zeros(curves.shape[1])).tolist()
            for key in ("NoC85", "NoC90", "failed85", "failed90"):
                row[f"{key}_mean"], row[f"{key}_std"] = method_table.mean_std([s["clicks"][key] for s in mine])
            row["runs"] = mine
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    clicks = len(rows[0]["mIoU_mean"]) - 1
    head = " | ".join(f"{k} click{'s' if k != 1 else ''}" for k in range(clicks + 1))
    lines = [f"| weights | first prompt | test mIoU % after {head} | NoC85 | NoC90 |",
             "|---|---|" + "---|" * (clicks + 3)]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{100 * m:.1f} +- {100 * s:.1f}" for m, s in zip(row["mIoU_mean"], row["mIoU_std"]))
        lines.append(
            f"| {row['variant']} | {row['protocol']} | {cells} "
            f"| {row['NoC85_mean']:.2f} +- {row['NoC85_std']:.2f} | {row['NoC90_mean']:.2f} +- {row['NoC90_std']:.2f} |"
        )
    return "\n".join(lines)


COLOURS = {"zero-shot": "#888888", "single-shot": "#1f77b4", "clicks": "#d62728"}


def svg(rows: list[dict], title: str) -> str:
    """The point-protocol curves as a small SVG line chart (mean, with a +- std band)."""
    rows = [row for row in rows if row["protocol"] == "point"]
    clicks = len(rows[0]["mIoU_mean"]) - 1
    width, height, left, top, bottom, right = 560, 340, 56, 36, 44, 150
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(k: float) -> float:
        return left + plot_w * k / max(clicks, 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - v)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="20" font-size="14">{title}</text>']  # fmt: skip
    for tick in range(0, 101, 20):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick / 100):.1f}" y2="{y(tick / 100):.1f}" '
                     f'stroke="#e5e5e5"/><text x="{left - 8}" y="{y(tick / 100) + 4:.1f}" text-anchor="end">{tick}'
                     "</text>")  # fmt: skip
    for k in range(clicks + 1):
        parts.append(f'<text x="{x(k):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">correction clicks after the '
                 "first click</text>")  # fmt: skip
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
                 'text-anchor="middle">test mIoU %</text>')  # fmt: skip
    for index, row in enumerate(rows):
        colour = COLOURS[row["variant"]]
        mean, std = np.array(row["mIoU_mean"]), np.array(row["mIoU_std"])
        band = [(x(k), y(m + s)) for k, (m, s) in enumerate(zip(mean, std))]
        band += [(x(k), y(m - s)) for k, (m, s) in reversed(list(enumerate(zip(mean, std))))]
        parts.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="{colour}" '
                     'fill-opacity="0.15"/>')  # fmt: skip
        line = " ".join(f"{x(k):.1f},{y(m):.1f}" for k, m in enumerate(mean))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        legend_y = top + 16 + 20 * index
        parts.append(f'<line x1="{left + plot_w + 14}" x2="{left + plot_w + 34}" y1="{legend_y}" y2="{legend_y}" '
                     f'stroke="{colour}" stroke-width="2"/><text x="{left + plot_w + 40}" y="{legend_y + 4}">'
                     f"{row['variant']}</text>")  # fmt: skip
    return "\n".join(parts + ["</svg>"]) + "\n"


QUICK = {"seeds": [0], "clicks": 2, "output": ROOT / "runs" / "click-curves-quick"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="1 seed, 2 training steps on tiny generated splits, 2 clicks",
                           threads=1)  # fmt: skip
    parser.add_argument("--base", default=method_table.DEFAULT_BASE, choices=method_table.BASES)
    parser.add_argument("--method", default="dora", choices=[m for m in method_table.METHODS if m != "none"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clicks", type=int, default=5, help="correction clicks scored after the first prompt")
    parser.add_argument("--train-clicks", type=int, default=3, help="correction rounds per step of the clicks run")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "click-curves")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--svg", type=Path, help="also draw the point-protocol curves here")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = common.parse(parser, argv[: argv.index("--")] if "--" in argv else argv, quick=QUICK)
    args.argv = argv
    from samtune.demo.assets import prepare_demo
    from samtune.demo.bases import demo_base

    if args.quick:
        extra = method_table.quick_data(args.output, args.base) + extra
        data = args.output / "data" / "test"
        split = (data / "annotations.json", data / "images")
    else:
        paths = prepare_demo(base=args.base)
        split = (paths.test_annotations, paths.test_images)
    base = demo_base(args.base).folder
    scores = []
    for seed in args.seeds:
        for variant in VARIANTS:
            adapter = None
            if variant != "zero-shot":
                folder = args.output / variant
                method_table.run_one(args.method, seed, folder, train_args(variant, args.train_clicks) + extra,
                                     args.threads, args.device, args.base)  # fmt: skip
                adapter = folder / f"{args.method}-seed{seed}" / "best"
            elif seed != args.seeds[0]:  # the base is the same for every seed
                first = [s for s in scores if s["variant"] == "zero-shot" and s["seed"] == args.seeds[0]]
                scores += [dict(s, seed=seed) for s in first]
                continue
            model = base
            if adapter is not None and not (adapter / "adapter_config.json").exists():  # full / decoder: a model
                model, adapter = adapter, None
            for protocol in PROTOCOLS:
                out = args.output / "scores" / f"{variant}-seed{seed}-{protocol}-{args.clicks}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                result = score(model, adapter, split, protocol, args.clicks, out)
                scores.append({"variant": variant, "protocol": protocol, "seed": seed, "clicks": result["clicks"]})
    rows = summarise(scores)
    table = markdown(rows)
    print(table)
    args.json = args.json or args.output / "curves.json"
    common.report(args, rows, output=str(args.output), base=args.base, method=args.method, train_args=extra,
                  train_clicks=args.train_clicks, statistic="mean and sample std over seeds")  # fmt: skip
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.svg:
        args.svg.write_text(svg(rows, f"Click curves on the demo's test split ({args.base} base, {args.method})"))
    return rows


if __name__ == "__main__":
    main()
