"""Channel spaces, the op rule registry and the analysis that turns them into groups."""
from .analysis import analyze, run_rules
from .graph import DependencyGraph, Group
from .registry import register_rule

__all__ = ["analyze", "run_rules", "DependencyGraph", "Group", "register_rule"]
