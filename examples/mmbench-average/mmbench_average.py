"""Plain weight averaging (Wortsman et al., 2022, "Model soups"), as a third-party
mmbench plugin: θ = mean_k θ_k = θ_pre + (1/K)·Σ_k τ_k. One parameter, ``scale``
(1 = the soup), to show how a plugin declares what ``--set average.scale=...`` may be."""
import mmbench
from mmbench.api import Merged, Merger, Param


class WeightAverage(Merger):
    name = "average"
    description = "Weight averaging of the fine-tuned models (model soup)"
    # checked before anything runs: `--set average.scale=-1` is a one-line error (exit 2);
    # `mmbench plugins --params average` shows this table
    params = {
        "scale": Param(1.0, "float", min=0, help="multiplies the averaged task vector (1 = the model soup)"),
    }

    def merge(self, pretrained, task_vectors, ctx, params):
        coefficient = params["scale"] / len(task_vectors)
        merged = {name: tensor.clone() for name, tensor in pretrained.items()}
        for vector in task_vectors.values():
            for name, delta in vector.items():
                merged[name].add_(delta, alpha=coefficient)
        return Merged(merged, {"coefficient": coefficient})


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(WeightAverage())
