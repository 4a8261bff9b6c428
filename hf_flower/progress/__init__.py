"""What a run shows while it runs: the line per round (`lines`), the files clients and the ServerApp
write during a round (`live`; `callback` is the Trainer callback that writes a client's), and the
launcher's view of them (`view`). Only `callback` imports torch."""
