"""`python -m mergekit_subspace ...` (and `torchrun ... -m mergekit_subspace ...`) runs the command line."""

from mergekit_subspace.cli import main

main()
