"""One federated client: `hf-flower client`, run from a checkout, also under Accelerate.

    python scripts/client.py --superlink server.example.org:9092 --root_certificates certs/ca.crt \
        --partition_id 0 --num_partitions 2
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes "$(nvidia-smi -L | wc -l)" \
        scripts/client.py --superlink server.example.org:9092 --root_certificates certs/ca.crt \
        --data_path my_reviews.csv

The command lives in the library (`hf_flower/commands/client.py`, whose docstring has more
examples); `python scripts/client.py --help` lists its flags.
"""

import sys

from hf_flower.commands.client import main

if __name__ == "__main__":
    sys.exit(main())
