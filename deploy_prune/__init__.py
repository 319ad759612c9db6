"""deploy-prune: prune a PyTorch CNN, finetune it, export it to ONNX, verify it and prove its speedup on ONNX
Runtime.

Public entry points::

    from deploy_prune.surgery import analyze, prune_channels
    from deploy_prune.pipeline import run
"""

__version__ = "0.1.0"
