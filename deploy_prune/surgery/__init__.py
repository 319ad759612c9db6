"""Channel surgery: dependency analysis (graph), channel choice (plan) and removal (apply)."""

from deploy_prune.surgery.apply import prune_channels, replay
from deploy_prune.surgery.graph import Channel, DependencyGraph, Group, analyze, trace
from deploy_prune.surgery.plan import (PlanConfig, choose, comparable_scores, global_counts, kept_count,
                                       plan_from_roots, roots_from_plan, select, uniform_counts)

__all__ = ["Channel", "DependencyGraph", "Group", "PlanConfig", "analyze", "choose", "comparable_scores",
           "global_counts", "kept_count", "plan_from_roots", "prune_channels", "replay", "roots_from_plan", "select",
           "trace", "uniform_counts"]
