"""Channel surgery: dependency analysis (graph), channel choice (plan) and removal (apply)."""

from deploy_prune.surgery.apply import LayerChange, prune_channels, removed_plan, replay, roots_from_plan
from deploy_prune.surgery.graph import Channel, DependencyGraph, Group, analyze, trace
from deploy_prune.surgery.plan import PlanConfig, kept_count, select

__all__ = ["Channel", "DependencyGraph", "Group", "LayerChange", "PlanConfig", "analyze", "kept_count",
           "prune_channels", "removed_plan", "replay", "roots_from_plan", "select", "trace"]
