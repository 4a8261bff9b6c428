"""Federated fine-tuning on this machine, with Flower's simulation engine.

Offline quickstart (all-MiniLM-L6-v2 on IMDB reviews, no network; `configs/` is in the repository):

    hf-flower simulate --config configs/quickstart.yaml

Any flag overrides the YAML file, including every `transformers.TrainingArguments` flag:

    hf-flower simulate --config configs/quickstart.yaml \
        --num_clients 4 --partitioner dirichlet --dirichlet_alpha 0.5 --learning_rate 3e-5

With the Hugging Face Hub (the setup of Flower's Hugging Face quickstart):

    hf-flower simulate --config configs/imdb_distilbert.yaml

Your own Trainer (`make_trainer(context)` in your script; `python my_script.py simulate ...` is the
same when the script ends with `hf_flower.main(make_trainer)`):

    hf-flower simulate --trainer my_script.py:make_trainer --trainer_config '{"epochs": 3}' --num_clients 4

`hf-flower simulate --help` lists every flag.
"""

import sys

from ..launch.plan import launch
from ..launch.simulation import prepare_simulation, run_simulation


def main(argv: list[str] | None = None) -> int:
    return launch(prepare_simulation, run_simulation, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
