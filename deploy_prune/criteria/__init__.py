"""Pruning criteria: every built-in is imported (and so registered) here, in one place.

=============  ==========================================  =====================================
name           paper                                       module
=============  ==========================================  =====================================
``l1``         Li et al. 2017, filter L1 norm               :mod:`deploy_prune.criteria.l1`
``slimming``   Liu et al. 2017, BN scaling factors          :mod:`deploy_prune.criteria.slimming`
``fpgm``       He et al. 2019, geometric median             :mod:`deploy_prune.criteria.fpgm`
``apoz``       Hu et al. 2016, zeros after ReLU             :mod:`deploy_prune.criteria.apoz`
``lottery``    Frankle & Carbin 2019 (L1 for structured)    :mod:`deploy_prune.criteria.lottery`
``random``     control                                      :mod:`deploy_prune.criteria.random`
=============  ==========================================  =====================================

Per-layer sensitivity sweeps live in :mod:`deploy_prune.criteria.sensitivity` (not a criterion).
"""

# The surgery package imports ``criteria.base`` (the planner's type) while ``criteria.base`` imports
# ``surgery.graph``; loading surgery first makes either import order work.
import deploy_prune.surgery  # noqa: F401  isort: skip

from deploy_prune.criteria import apoz, fpgm, l1, lottery, random, slimming  # noqa: F401  (registers them)
from deploy_prune.criteria.base import Criterion, ScoreContext, create, names, register

__all__ = ["Criterion", "ScoreContext", "create", "names", "register"]
