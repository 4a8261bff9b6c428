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

from hf_flower.launch.plan import launch, prepare_simulation
from hf_flower.launch.simulation import run_simulation


def main(argv: list[str] | None = None) -> int:
    return launch(prepare_simulation, run_simulation, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
