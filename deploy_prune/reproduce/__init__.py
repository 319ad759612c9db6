"""``deploy-prune reproduce``: the survey's experiments on the embedded digits, each result beside the paper's.

One module per experiment (see :mod:`deploy_prune.reproduce.common` for what each exposes) and a runner
(:func:`deploy_prune.reproduce.runner.reproduce`) that writes ``reproduce.json``, ``reproduce.md`` and one
plot per experiment.
"""

from deploy_prune.reproduce.runner import EXPERIMENTS, reproduce

__all__ = ["EXPERIMENTS", "reproduce"]
