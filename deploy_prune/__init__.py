"""deploy-prune: prune a PyTorch CNN, finetune it, export it to ONNX, verify it and prove its speedup on ONNX
Runtime.

The public Python API is what ``__all__`` lists (docs/api.md); every other module and name is private and may
change without notice::

    import deploy_prune as dp

    res = dp.prune(model, example_input, criterion="l1", ratio=0.5)   # res.model, res.plan (JSON data)
    dp.export(res.model, example_input, "model.onnx")                  # export + cleanup + parity gate
    dp.benchmark(["dense.onnx", "model.onnx"])                         # interleaved ONNX Runtime benchmark
    model = dp.load("bundle/pruned.pt")                                # a bundle's pruned model, to finetune

Errors are the exceptions below; ``str(exc)`` is the one-line message the command line prints.
"""

__version__ = "0.1.0"

# ``prune`` and ``export`` are also the names of internal submodules. Importing them here first means the
# import system has already bound (and will never re-bind) those attributes when the API functions below take
# the names over. Internal code therefore imports ``from deploy_prune.export import ...``, never
# ``from deploy_prune import export`` (which yields the function).
import deploy_prune.export as _export_module  # noqa: E402,F401
import deploy_prune.prune as _prune_module  # noqa: E402,F401
from deploy_prune.api import ExportResult, PruneResult, benchmark, export, load, prune  # noqa: E402
from deploy_prune.errors import (  # noqa: E402
    BadInput,
    DeployPruneError,
    ParityError,
    TargetUnreachable,
    UnsupportedModel,
)
from deploy_prune.timing import BenchResult, LatencyStats  # noqa: E402

__all__ = [
    "prune",
    "export",
    "benchmark",
    "load",
    "PruneResult",
    "ExportResult",
    "BenchResult",
    "LatencyStats",
    "DeployPruneError",
    "BadInput",
    "UnsupportedModel",
    "TargetUnreachable",
    "ParityError",
    "__version__",
]
