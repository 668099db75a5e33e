"""Plans applied at training time: recompute regions, offload, and what they cost on a device."""

from planner.execution.handle import Handle, PlanMismatch, apply, check_plan

__all__ = ["Handle", "PlanMismatch", "apply", "check_plan"]
