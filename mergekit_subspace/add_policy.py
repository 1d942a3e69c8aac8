"""What `add` / `add-many` do with a task the basis holds badly: the policies, the error guard, and its check.

Torch-free, so the command line can show the choices and the default without importing the math.
The default guard, 0.2, was measured on the mixed zoo (`benchmarks/results/add-policy-mixed120*`): at 0.5
the worst added task kept 0.954 of its accuracy, at 0.3 0.978, at 0.2 0.989.
"""

from __future__ import annotations

from mergekit_subspace.errors import SubspaceError

POLICIES = ("auto", "project", "grow")
DEFAULT_MAX_REL_ERROR = 0.2
GROW_MARGIN = 0.5  # grow to half the guard, so quantization of the new columns cannot push it back over


def check_policy(policy: str, max_rel_error: float) -> None:
    """Refuse a policy or guard that cannot be met, before anything is read."""
    if policy not in POLICIES:
        raise SubspaceError(f"policy must be one of {', '.join(POLICIES)}, not '{policy}'")
    if not max_rel_error > 0:  # NaN fails this too; inf means no guard
        raise SubspaceError(f"max_rel_error must be a number above 0 (inf: no guard), not {max_rel_error}")
