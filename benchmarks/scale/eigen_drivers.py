"""The eigen stage's solver on this machine: symmetric eigendecompositions of 7B and 13B widths (4096,
5120) in float32, by scipy's LAPACK drivers (OpenBLAS) and torch.linalg.eigh (MKL's LAPACK in the CPU
wheel), at 1 and 2 threads, and two problems at once at one thread each (q, k and v of a block are
independent problems). What streamrom's ROM needs per linear is the top r ≈ 40 % of the spectrum of
a square 7B projection at 20 % smaller; `evr` can compute only those. At 2 threads the products
around the solves too, as computed before and after the triangular factor and the one-triangle
Gram products (BLAS trmm/syrk) replaced GEMMs and the root's eigh, and a chunk's moment product in
torch's GEMM against scipy's syrk.

    python -m benchmarks.scale.eigen_drivers            # writes benchmarks/results/eigen_drivers.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.common import REPO, header
RESULTS = REPO / "benchmarks" / "results" / "eigen_drivers.json"

CHILD = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, scipy.linalg, torch
size, threads, kept = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(threads)
rng = np.random.default_rng(0)
def problem():
    a = rng.standard_normal((size, size)).astype(np.float32)
    return a @ a.T / size
matrix = problem()
rank = int(kept * size)
def timed(solve, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        solve()
        best = min(best, time.perf_counter() - started)
    return best
rows = {
    "scipy evd (all)": timed(lambda: scipy.linalg.eigh(matrix, driver="evd")),
    f"scipy evr (top {kept:.0%})": timed(lambda: scipy.linalg.eigh(matrix, driver="evr",
                                                                  subset_by_index=(size - rank, size - 1))),
    "torch.linalg.eigh (all)": timed(lambda: torch.linalg.eigh(torch.from_numpy(matrix))),
}
if threads == 1:
    other = problem()
    with ThreadPoolExecutor(2) as pool:
        rows["two scipy evd at once (per problem)"] = timed(
            lambda: list(pool.map(lambda m: scipy.linalg.eigh(m, driver="evd"), (matrix, other)))) / 2
if threads == 2:  # the products around the solves, as the code computed them before and now does
    from scipy.linalg import blas
    weight = rng.standard_normal((size, size)).astype(np.float32)
    wide = rng.standard_normal((int(size * 2.6875), size)).astype(np.float32)  # gate/up: 11008 x 4096
    tokens = rng.standard_normal((2048, size)).astype(np.float32)  # one chunk of activations
    factor = scipy.linalg.cholesky(matrix, lower=True)
    square = lambda m: np.array(m.T, order="F")
    rows.update({
        "W C Wᵀ, two GEMMs (before)": timed(lambda: weight @ matrix @ weight.T),
        "W L Lᵀ Wᵀ: trmm + syrk (now)": timed(lambda: blas.ssyrk(1.0, blas.strmm(1.0, factor, square(weight), side=0,
                                                                           lower=1, trans_a=1, overwrite_b=1), trans=0)),
        "root of C by eigh (before)": timed(lambda: scipy.linalg.eigh(matrix, driver="evd")),
        "root of C by Cholesky (now)": timed(lambda: scipy.linalg.cholesky(matrix, lower=True, check_finite=False)),
        "gate/up W·root, GEMM (before)": timed(lambda: wide @ factor),
        "gate/up W·L, trmm (now)": timed(lambda: blas.strmm(1.0, factor, square(wide), side=0, lower=1, trans_a=1,
                                                           overwrite_b=1)),
        "chunk Xᵀ X, torch GEMM (used)": timed(lambda: torch.from_numpy(tokens).T @ torch.from_numpy(tokens)),
        "chunk Xᵀ X, scipy syrk (tried, not used)": timed(lambda: blas.ssyrk(1.0, tokens.T, trans=0)),
    })
print(json.dumps(rows))
"""


def main() -> None:

    results = []
    for size in (4096, 5120):
        for threads in (1, 2):
            env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads)}
            if threads == 1:  # the two-at-once row runs two single-threaded problems on the two cores
                env["OPENBLAS_NUM_THREADS"] = "1"
            out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(threads), "0.4"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            for solver, seconds in json.loads(out).items():
                results.append({"size": size, "threads": threads, "solver": solver, "seconds": seconds})
                print(f"| {size} | {threads} | {solver} | {seconds:.2f} s |", flush=True)
    RESULTS.write_text(json.dumps({"header": header("scale.eigen_drivers"), "dtype": "float32",
                                   "rows": results}, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
