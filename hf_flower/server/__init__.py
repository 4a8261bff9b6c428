"""What runs on the server: the ServerApp (`server_app`), the Grid a strategy sees (`round_grid`) and
a reply's one path through it (`replies`, `validation`), strategies by name (`strategies`), a round's
end (`rounds`, `tracking`; where and how its central evaluation runs: `evaluation_placement`),
`resume` and the checks before a run (`preflight`). Nothing here imports `hf_flower.client`."""
