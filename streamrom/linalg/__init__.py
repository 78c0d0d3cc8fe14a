"""The math on arrays: decompositions, structured pruning's algebra, rank allocation, the bayes search's
points. numpy and scipy only: no torch, no files."""
