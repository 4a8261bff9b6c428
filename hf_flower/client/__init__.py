"""What runs on a client: the ClientApp (`client_app`), the Trainer a process trains with (`session`),
a round on it (`round_driver`, `callbacks`), what a failing client tells the server (`failures`),
and the jobs rank 0 hands the other ranks of an `accelerate launch` (`ranks`). Nothing here imports
`hf_flower.server`."""
