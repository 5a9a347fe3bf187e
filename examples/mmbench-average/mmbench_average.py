"""Plain weight averaging (Wortsman et al., 2022, "Model soups"), as a third-party
mmbench plugin: θ = mean_k θ_k = θ_pre + (1/K)·Σ_k τ_k. No hyperparameters."""
import mmbench
from mmbench.api import Merged, Merger


class WeightAverage(Merger):
    name = "average"
    description = "Weight averaging of the fine-tuned models (model soup)"
    defaults = {}

    def merge(self, pretrained, task_vectors, ctx, params):
        k = len(task_vectors)
        merged = {name: tensor.clone() for name, tensor in pretrained.items()}
        for vector in task_vectors.values():
            for name, delta in vector.items():
                merged[name].add_(delta, alpha=1.0 / k)
        return Merged(merged, {"coefficient": 1.0 / k})


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(WeightAverage())
