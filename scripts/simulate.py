"""Federated fine-tuning on this machine, with Flower's simulation engine.

Offline quickstart (all-MiniLM-L6-v2 on IMDB reviews, no network):

    python scripts/simulate.py --config configs/quickstart.yaml

Any flag overrides the YAML file, including every `transformers.TrainingArguments` flag:

    python scripts/simulate.py --config configs/quickstart.yaml \
        --num_clients 4 --partitioner dirichlet --dirichlet_alpha 0.5 --learning_rate 3e-5

With the Hugging Face Hub (the setup of Flower's Hugging Face quickstart):

    python scripts/simulate.py --config configs/imdb_distilbert.yaml
"""

import sys

from hf_flower.launch.plan import prepare_in_child, prepare_simulation
from hf_flower.launch.simulation import run_simulation


def main(argv: list[str] | None = None) -> int:
    prepared = prepare_in_child(prepare_simulation, sys.argv[1:] if argv is None else argv)
    if prepared.plan is None:
        if prepared.error:
            print(prepared.error, file=sys.stderr)
        return prepared.exit_code
    try:
        return run_simulation(prepared.plan)
    except KeyboardInterrupt:  # every Flower process is already stopped by then
        print("Interrupted; the rounds saved so far are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
