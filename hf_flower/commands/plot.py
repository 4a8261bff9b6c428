"""Draw the per-round metrics (accuracy, ...) and loss of a run (from its history.json) as a PNG:

    hf-flower plot outputs/quickstart                 # -> outputs/quickstart/metrics.png
    hf-flower plot outputs/quickstart --out plot.png

Every round folder already holds the plot of the rounds up to it (metrics.png, linked from its
README.md model card); this draws it for any run, also one that is still running or failed.
"""

import argparse
import sys
from pathlib import Path

from .. import checkpoint
from ..model_card import card_metrics, plot_rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", help="The run's --output_dir (holds history.json).")
    parser.add_argument("--out", help=f"Where to write the PNG (default: OUTPUT_DIR/{checkpoint.PLOT_FILE}).")
    args = parser.parse_args(argv)
    try:
        history = checkpoint.read_history(args.output_dir)
        rounds = history["rounds"]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rounds:
        print(f"error: {args.output_dir}/history.json holds no round yet.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.output_dir) / checkpoint.PLOT_FILE
    scores = card_metrics(rounds[-1].get("central", {}), history.get("best_metric", "eval_loss"))
    plot_rounds(rounds, out, title=Path(args.output_dir).resolve().name, scores=scores)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
