"""`mergekit-subspace bench`: accuracy and bytes of a compressed zoo beside honest baselines."""
