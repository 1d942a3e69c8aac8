"""Merging tasks in the shared subspace: one merged core per slot, exported as PEFT folder(s) or a full model."""

from mergekit_subspace.merge.methods import METHODS, MergeMethod, SlotInputs, get_method
from mergekit_subspace.merge.recipe import MergeRecipe, parse_merge_recipe
from mergekit_subspace.merge.run import MergeResult, merge

__all__ = [
    "METHODS",
    "MergeMethod",
    "MergeRecipe",
    "MergeResult",
    "SlotInputs",
    "get_method",
    "merge",
    "parse_merge_recipe",
]
