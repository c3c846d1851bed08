"""The task-vector family as stages: sparsifier × sign consensus × combiner, then the scale.

* :mod:`.sparsify`: sparsifiers (magnitude top-k, random drop, MagPrune, outlier bands, none),
  their masks and rescale rules, and the parameter models the sparsifying methods share;
* :mod:`.sign_consensus`: TIES sign election and the disjoint merge;
* :mod:`.combine`: combiners (disjoint mean/sum after election, weighted sum);
* :mod:`.pipeline`: the one chunked loop θ0 + λ · combine(sparsify(θ_i − θ0)) that TIES, DARE,
  DELLA and Model Breadcrumbs declare themselves over (mergekit's generalized task arithmetic).
"""
