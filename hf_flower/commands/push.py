"""Push the rounds of an existing run to the Hugging Face Hub, as a live `--push_to_hub` run does.

Round N goes to branch `round-N` and `main` is moved to the last round pushed, so
`from_pretrained("OWNER/NAME", revision="round-2")` and `from_pretrained("OWNER/NAME")` work:

    hf-flower push outputs/quickstart --hub_model_id alice/minilm-imdb-federated
    hf-flower push outputs/quickstart --hub_model_id alice/minilm-imdb-federated --rounds 2 3

The token comes from HF_TOKEN or `hf auth login`, never from a flag. The round folders are
checked (complete, and each file as saved: its checksums) before anything is uploaded, and only
the files a round's checksums.json lists go up: a round holding a link is refused, a file the
list does not name stays here. Nothing local is changed. Each round's metrics.json goes up with
aggregate metrics only. A new repo is private unless `--hub_private false`.
"""

import argparse
import sys
from pathlib import Path

from transformers.hf_argparser import string_to_bool

from .. import checkpoint, hub


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", help="The run's --output_dir (holds round-N folders).")
    parser.add_argument(
        "--hub_model_id", required=True, help="OWNER/NAME of the model repo (created if missing)."
    )
    parser.add_argument("--rounds", type=int, nargs="+", help="Rounds to push (default: every round).")
    parser.add_argument(
        "--hub_private",
        type=string_to_bool,
        nargs="?",
        const=True,
        default=True,
        help="Create the repo private (default); `--hub_private false` creates it public. An existing "
        "repo keeps its visibility.",
    )
    return parser


def rounds_to_push(output_dir: Path, rounds: list[int] | None) -> list[int]:
    """The rounds to push, each a complete, undamaged folder; a clear error for any other."""
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir} is not a folder; pass the --output_dir of a run.")
    named = sorted(
        int(p.name.removeprefix(checkpoint.ROUND_PREFIX))
        for p in output_dir.glob(f"{checkpoint.ROUND_PREFIX}*")
        if p.name.removeprefix(checkpoint.ROUND_PREFIX).isdigit()
    )
    wanted = sorted(set(rounds)) if rounds else named
    if not wanted:
        raise ValueError(f"{output_dir} holds no round-N folders; pass the --output_dir of a run.")
    for round_num in wanted:
        folder = checkpoint.round_dir(output_dir, round_num)
        if not folder.is_dir():
            raise ValueError(f"{folder} does not exist; rounds in {output_dir}: {named or 'none'}.")
        if not checkpoint.is_complete_round(folder):
            files = sorted(p.name for p in folder.iterdir())
            raise ValueError(
                f"{folder} is incomplete: it needs {checkpoint.CONFIG_FILE}, {checkpoint.WEIGHTS_FILE} (or its "
                f"sharded index) and {checkpoint.METRICS_FILE}, and holds {files}. Leave it out with --rounds."
            )
        try:
            checkpoint.checked_files(folder)
        except checkpoint.DamagedRoundError as err:
            raise ValueError(f"{err}; leave round {round_num} out with --rounds.") from None
    return wanted


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        rounds = rounds_to_push(output_dir, args.rounds)
        repo_id = hub.check_push_access(args.hub_model_id)
        hub.create_repo(repo_id, private=args.hub_private)
    except (ValueError, hub.HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pusher = hub.RoundPusher(repo_id)
    for round_num in rounds:
        ok = pusher.push(
            round_num, checkpoint.round_dir(output_dir, round_num), update_main=round_num == rounds[-1]
        )
        print(
            f"round {round_num}: {'pushed to branch ' + hub.round_branch(round_num) if ok else 'FAILED'}",
            flush=True,
        )
    failed = sorted(pusher.failures)
    if failed:
        print(f"error: pushing rounds {failed} to {repo_id} failed; see the messages above.", file=sys.stderr)
        return 1
    print(f"Pushed rounds {rounds} to {repo_id}; main is round {rounds[-1]}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
