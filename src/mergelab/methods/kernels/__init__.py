"""Numerical kernels shared by the methods, one set of names (no method logic here).

* :mod:`.select`: exact order statistics by radix histograms, for magnitudes and signed values;
* :mod:`.random`: seeded 16-bit uniforms and Bernoulli keep indicators;
* :mod:`.ranks`: per-row magnitude ranks (DELLA);
* :mod:`.chunks`: chunking of flattened tensors, scratch buffers, the expert thread pool;
* :mod:`.tensors`: task vectors and weighted sums;
* :mod:`.linalg`: SVD helpers (polar factor).
"""
