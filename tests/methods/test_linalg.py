"""thin_svd: the package's one SVD call, retried in float64 when LAPACK's gesdd fails to converge
(fault-injected here: the failing float32 matrices come from real checkpoints, see its docstring)."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods.iso import iso_cts_matrix
from mergelab.methods.kernels import linalg
from mergelab.methods.kernels.linalg import polar_factor, thin_svd

REAL_SVD = torch.linalg.svd


def _failing_below_float64(a, full_matrices=True, **kw):
    if a.dtype != torch.float64:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (injected)")
    return REAL_SVD(a, full_matrices=full_matrices, **kw)


def test_thin_svd_is_torch_svd_when_it_converges() -> None:
    a = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    for got, want in zip(thin_svd(a), REAL_SVD(a, full_matrices=False)):
        assert torch.equal(got, want)


def test_thin_svd_retries_in_float64_and_keeps_the_dtype(monkeypatch) -> None:
    a = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linalg.torch.linalg, "svd", _failing_below_float64)
    u, s, vh = thin_svd(a)
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (9, 5) and vh.shape == (5, 5)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, atol=1e-5, rtol=1e-5)
    s64 = REAL_SVD(a.double(), full_matrices=False)[1]
    torch.testing.assert_close(s, s64.float())

    # an input already in float64 has nothing to fall back to
    def always_failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (injected)")

    monkeypatch.setattr(linalg.torch.linalg, "svd", always_failing)
    with pytest.raises(torch.linalg.LinAlgError):
        thin_svd(a.double())


def test_iso_cts_and_the_polar_factor_survive_a_failing_float32_svd(monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(12, 8, generator=g) * 0.1 for _ in range(3)]
    want = iso_cts_matrix([t.double() for t in taus], 0.5).float()
    want_polar = polar_factor(taus[0].double()).float()
    monkeypatch.setattr(linalg.torch.linalg, "svd", _failing_below_float64)
    torch.testing.assert_close(iso_cts_matrix(taus, 0.5), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(polar_factor(taus[0]), want_polar, atol=1e-5, rtol=1e-4)
