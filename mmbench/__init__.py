"""mmbench: a benchmark suite for backdoor attacks and defenses in model merging."""
import pluggy

__version__ = "0.2.0"

hookimpl = pluggy.HookimplMarker("mmbench")

__all__ = ["hookimpl", "__version__"]
