"""The error measure shared by the tests and the benchmarks' correctness gates."""


def rel_err(out, ref):
    """``||out - ref|| / ||ref||`` computed in float64; NaN anywhere in ``out`` makes it NaN, so
    ``not rel_err(out, ref) <= tol`` also rejects NaN."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
