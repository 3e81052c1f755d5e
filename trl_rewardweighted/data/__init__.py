"""Dataset transforms that know nothing of training (relabeling, row/group/pair conversions)."""
