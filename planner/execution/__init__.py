"""Plans applied at training time: recompute regions, offload, and what they cost on a device."""

from planner.execution.handle import Handle, PlanMismatch, apply, check_plan
from planner.execution.recompute import ReplayFailed

__all__ = ["Handle", "PlanMismatch", "ReplayFailed", "apply", "check_plan"]
