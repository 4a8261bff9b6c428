"""Only what makes rounds cheap, both halves of each protocol side by side.

- `wire`: the weights as they travel: cast to `--transfer_dtype`, packed as one flat array;
- `exchange`: the server's push and pull of a round's messages, weights sent by id to nodes that
  hold them, resent when they do not, messages expiring with their round;
- `averaging`: training replies averaged as they arrive, for the strategies where that is exact;
- `client_loop`: the long-lived client's polling for tasks and its handling of each message;
- `supernode`: Flower's SuperNode with shorter polling waits and a settable heartbeat;
- `flwr_compat`: the one module that imports Flower internals, and checks the Flower version.
"""
