"""huggingface_example: A Flower / Hugging Face app."""

# Copied from Flower's examples/quickstart-huggingface (adap/flower at
# fdef7afb1dca3030553be302366cfd285ed6632c) for benchmarks/vs_quickstart.py. Changes, and only these:
# - `strategy.start` also gets an `evaluate_fn` that saves each round's aggregate (round 0: the initial
#   weights) as `round-N.safetensors` in the run config's `output-dir`, and evaluates nothing: the
#   harness evaluates every round afterwards, the same way for both systems.
# - the final model is saved with safetensors (upstream: torch.save to final_model.pt) into that
#   folder; `import torch` went with it.

from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import save_file

from huggingface_example.task import get_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:

    # Define model to federate and extract parameters
    model_name = context.run_config["model-name"]
    model = get_model(model_name)
    arrays = ArrayRecord(model.state_dict())

    # Instantiate strategy
    fraction_train = context.run_config["fraction-train"]
    fraction_evaluate = context.run_config["fraction-evaluate"]
    strategy = FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
    )

    num_rounds = context.run_config["num-server-rounds"]
    output_dir = Path(context.run_config["output-dir"])
    output_dir.mkdir(parents=True, exist_ok=True)

    def save_round(server_round: int, arrays: ArrayRecord) -> None:
        """Save the aggregate of `server_round` for the harness to evaluate."""
        state_dict = arrays.to_torch_state_dict()
        save_file(state_dict, str(output_dir / f"round-{server_round}.safetensors"))

    # Start the strategy
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=num_rounds,
        evaluate_fn=save_round,
    )

    # Save final model to disk
    print("\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    save_file(state_dict, str(output_dir / "final_model.safetensors"))
