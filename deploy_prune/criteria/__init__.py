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

A new criterion is one module with a ``@register``-ed class (see :mod:`deploy_prune.criteria.base`) and one
import line here. Per-layer sensitivity sweeps live in :mod:`deploy_prune.sensitivity` (not a criterion).
"""

from deploy_prune.criteria.base import (BaseCriterion, Criterion, CriterionOptions, NoOptions, ScoreContext, default_of,
                                        create, get, make_options, names, option, option_fields, register,
                                        unregister)

# registration order is the order the CLI lists them in
from deploy_prune.criteria import l1, slimming, fpgm, apoz, lottery, random  # noqa: E402,F401  isort: skip

__all__ = ["BaseCriterion", "Criterion", "CriterionOptions", "NoOptions", "ScoreContext", "create", "default_of", "get",
           "make_options", "names", "option", "option_fields", "register", "unregister"]
