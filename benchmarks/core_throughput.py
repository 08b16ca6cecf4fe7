"""Core throughput: simulations/second of the numba Forest vs plain Python vs mctx (JAX CPU).

Workload (identical for all three): B trees, S simulations per tree, K children per
expansion, PUCT (c_base=19652, c_init=1.25), a trivial constant value 0.5. One simulation
= select one leaf per tree, expand it with K children (uniform priors), back up the
value from that leaf. This is what one mctx simulation does too (a new node whose K
action slots carry priors), so the trees have the same shape.

Usage: python benchmarks/core_throughput.py [--quick] [--no-write]
The table (with this command) goes into the "Core throughput" section of
benchmarks/RESULTS.md. --quick runs only B=1024, S=256, K=8 and ends with its ratios.
Never a test: timings depend on the machine and its load (reported alongside).
The numba rows go through the public Forest.select/expand/backup calls, one per wave,
exactly as the search loop does; nothing fused. expand gets no rewards (stored as
unscored, NaN); the search passes its reward scores, which adds their store.
Side by side: for each (B, S, K) the numba columns and mctx are timed in alternating
rounds (each round: every numba column once, then mctx once), because this VM's speed
drifts by +-30% over seconds to minutes; the ratios compare medians of the same rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402

from mcts.tree import PARALLEL_MIN_TREES, Forest  # noqa: E402
from tests.reference_mcts import ReferenceForest  # noqa: E402

VALUE = 0.5
SECTION = "## Core throughput"
QUICK_PY_TREES = 256
SAMPLE_S = 0.5  # seconds of runs behind one numba sample (see numba_rate)
JAX_CACHE = Path.home() / ".cache" / "mcts" / "jax_core_throughput"

_WARM_SNIPPET = (
    "import time; t=time.perf_counter(); import numpy as np; from mcts.tree import Forest; "
    "f=Forest(2, capacity=8); tr,nd=f.select(1); f.expand(tr,nd,np.full(2,2),np.full(4,.5)); "
    "f.backup(tr,nd,np.full(2,.5)); f.best_leaves(); f.leaf_paths(0); "
    "print(time.perf_counter()-t)"
)


def numba_rate(forest: Forest, S: int, K: int, reps: int, min_s: float = 0.0) -> float:
    """Simulations/s of S waves through the public stepwise API: the median of `reps`
    samples, each sample as many runs (>= 1) as fill `min_s` seconds, timed together.

    Each wave is what the search does: Forest.select (1 leaf per tree), Forest.expand
    (K children each), Forest.backup (one value per leaf). The forest is reset before
    each run (allocation reused, as the search does; the reset is not timed). Why min_s:
    one run at B=1024 takes ~0.1 s and this VM's speed swings +-30% within a second, so a
    sample as long as one mctx call (~1-3 s) sees the same mix of fast and slow moments.
    """
    B = forest.n_trees
    counts = np.full(B, K, dtype=np.int64)
    priors = np.full(B * K, 1.0 / K)
    values = np.full(B, VALUE)
    rates = []
    for _ in range(reps):
        spent, runs = 0.0, 0
        while runs == 0 or spent < min_s:
            forest.reset()
            t = time.perf_counter()
            for _ in range(S):
                trees, nodes = forest.select(1)
                n = trees.size
                forest.expand(trees, nodes, counts[:n], priors[: n * K])
                forest.backup(trees, nodes, values[:n])
            spent += time.perf_counter() - t
            runs += 1
            assert int(forest.visits[:, 0].min()) == S, "every tree must have run S simulations"
        rates.append(B * S * runs / spent)
    return float(np.median(rates))


def python_rate(B: int, S: int, K: int, reps: int) -> float:
    """Median simulations/s of the plain-Python reference on the same workload."""
    rates = []
    for _ in range(reps):
        ref = ReferenceForest(B)
        priors = [1.0 / K] * K
        t = time.perf_counter()
        for _ in range(S):
            trees, nodes = ref.select(1)
            ref.expand(trees, nodes, [K] * len(trees), priors * len(trees))
            ref.backup(trees, nodes, [VALUE] * len(trees))
        dt = time.perf_counter() - t
        assert all(tr.root.visits == S for tr in ref.trees)
        rates.append(B * S / dt)
    return float(np.median(rates))


def mctx_runner(B: int, S: int, K: int) -> tuple[float, Callable[[], float]] | None:
    """(first-call seconds, run) for mctx.muzero_policy on JAX CPU, or None without mctx.

    run() times one more call and returns its simulations/s. JAX's persistent compilation
    cache (JAX_CACHE) is on, so the first call compiles (cold cache) or loads the compiled
    search (warm); either way it is timed apart.
    """
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except ImportError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    def recurrent_fn(params, rng_key, action, embedding):
        out = mctx.RecurrentFnOutput(
            reward=jnp.zeros(B),
            discount=jnp.ones(B),
            prior_logits=jnp.zeros((B, K)),
            value=jnp.full(B, VALUE),
        )
        return out, embedding

    @jax.jit
    def search(key):
        root = mctx.RootFnOutput(
            prior_logits=jnp.zeros((B, K)), value=jnp.full(B, VALUE), embedding=jnp.zeros(B)
        )
        return mctx.muzero_policy(
            params=(),
            rng_key=key,
            root=root,
            recurrent_fn=recurrent_fn,
            num_simulations=S,
            dirichlet_fraction=0.0,
        ).action_weights

    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    search(key).block_until_ready()
    compile_s = time.perf_counter() - t

    def run() -> float:
        t = time.perf_counter()
        search(key).block_until_ready()
        return B * S / (time.perf_counter() - t)

    return compile_s, run


def _best(rates: dict[int, float], forced: float) -> float:
    """The fastest numba column: 1 thread, 2 threads (auto) or 2 forced (NaN = not run)."""
    return max([*rates.values(), forced if forced == forced else 0.0])


def compile_times(cold: bool) -> dict[str, float]:
    """Import + first calls of every kernel in a fresh process: warm cache, and cold."""
    out = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", _WARM_SNIPPET]
    out["warm"] = float(
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    )
    if cold:
        with tempfile.TemporaryDirectory() as d:
            env_cold = dict(env, NUMBA_CACHE_DIR=d)
            res = subprocess.run(cmd, env=env_cold, capture_output=True, text=True, check=True)
            out["cold"] = float(res.stdout)
    return out


def write_results(text: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only B=1024, S=256, K=8 (< 60 s)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    if args.quick:
        grid = [(1024, 256, 8)]
    else:
        grid = [(b, s, k) for k in (8, 32) for b in (1, 64, 1024) for s in (16, 64, 256)]
    threads = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
    # --quick times plain Python on 256 of the 1024 trees (same S and K per tree): its work
    # per tree does not depend on B (measured at S=128, K=8 under load ~3.5: 17-24k sims/s
    # on 256 trees vs 19-20k on 1024, within noise); it saves ~15 s of the 60.
    py_trees = QUICK_PY_TREES if args.quick else 1 << 30

    comp = compile_times(cold=not args.quick)
    # Warm this process's dispatchers (cache load) before timing anything.
    numba_rate(Forest(2, capacity=8), 2, 2, 1)
    numba_rate(Forest(64, capacity=8), 2, 2, 1)

    rows = []
    for B, S, K in grid:
        load0 = os.getloadavg()[0]
        small = B * S < 20000
        forest = Forest(B, capacity=1 + S * K)
        numba_rate(forest, S, K, 1)  # first touch of the allocation, outside the timing
        # numba configurations: (threads, Forest.threads); "2 forced" only where the pool
        # can be used at all (B >= PARALLEL_MIN_TREES, 2 threads available)
        configs = [(th, "auto") for th in threads]
        if max(threads) > 1 and B >= PARALLEL_MIN_TREES:
            configs.append((max(threads), "parallel"))
        mx = mctx_runner(B, S, K)
        # Rounds: each round runs every numba configuration once and mctx once, so all of
        # them see the same machine (its speed drifts by +-30% over minutes); medians over
        # rounds.
        runs: dict[object, list[float]] = {c: [] for c in configs}
        runs["mctx"] = []
        for _ in range(7 if small else 5):
            for th, policy in configs:
                numba.set_num_threads(th)
                forest.threads = policy
                runs[(th, policy)].append(numba_rate(forest, S, K, 1, min_s=SAMPLE_S))
            if mx is not None:
                runs["mctx"].append(mx[1]())
        forest.threads = "auto"
        numba.set_num_threads(max(threads))
        rates = {th: float(np.median(runs[(th, "auto")])) for th in threads}
        pc = (max(threads), "parallel")
        forced = float(np.median(runs[pc])) if pc in runs else float("nan")
        mxr = (mx[0], float(np.median(runs["mctx"]))) if mx is not None else None
        py = python_rate(min(B, py_trees), S, K, 3 if small else 1)
        load1 = os.getloadavg()[0]
        rows.append((B, S, K, rates, py, mxr, (load0, load1), forced))
        best = _best(rates, forced)
        mx_txt = f"mctx {mxr[1]:,.0f}/s" if mxr else "mctx n/a"
        print(
            f"B={B} S={S} K={K}: numba {' / '.join(f'{r:,.0f}' for r in rates.values())}"
            f" / forced {forced:,.0f}/s, python {py:,.0f}/s ({min(B, py_trees)} trees), "
            f"{mx_txt}, x{best / py:.0f} python (load {load0:.1f}-{load1:.1f})",
            flush=True,
        )

    cmd = "python benchmarks/core_throughput.py" + (" --quick" if args.quick else "")
    loads = [x for r in rows for x in r[6]]
    lines = [
        SECTION,
        "",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numba "
        f"{numba.__version__}; 1-minute load average {min(loads):.1f}-{max(loads):.1f} during "
        "the run, this benchmark's own threads included: every column shares the CPU with "
        "whatever else ran).",
        "Simulations/second; one simulation = select a leaf + expand K children + back up a "
        "constant value. numba columns: the public stepwise API the search uses (one "
        "Forest.select / expand / backup call per wave over all B trees, 1 leaf per tree), "
        f"median of 5-7 rounds on a reused, reset forest, each sample {SAMPLE_S} s or more of "
        "back-to-back runs timed together. Plain Python: the node-object "
        "reference (tests/reference_mcts.py), median of 1-3 runs"
        + (f" (--quick: on {QUICK_PY_TREES} of the B trees, same S and K)" if args.quick else "")
        + ". mctx: muzero_policy under jax.jit, "
        "one run per round after a first (compile) call. Each round runs every numba column "
        "once and mctx once, back to back, so they share the machine's state (medians over "
        "rounds); plain Python runs after. x Python / x mctx use the fastest numba column "
        "(a user picks it with Forest.threads); x mctx auto uses the default threads=auto.",
        "",
        "numba 2 threads = numba.set_num_threads(2) with the Forest's default "
        'threads="auto" (select uses the pool only while it measures faster than one '
        'thread); "2 forced" = threads="parallel" (the pool on every select; - where B '
        "< 64, which always runs on one thread).",
        "",
        "| B | S | K | numba 1 thread | numba 2 threads | 2 forced | plain Python "
        "| mctx (JAX CPU) | x Python | x mctx | x mctx auto | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for B, S, K, rates, py, mx, (l0, l1), forced in rows:
        best = _best(rates, forced)
        r1 = rates.get(1, float("nan"))
        r2 = rates.get(2, float("nan"))
        mxs = f"{mx[1]:,.0f}" if mx else "n/a"
        mxr = f"{best / mx[1]:.1f}" if mx else "n/a"
        mxa = f"{max(rates.values()) / mx[1]:.1f}" if mx else "n/a"
        lines.append(
            f"| {B} | {S} | {K} | {r1:,.0f} | {r2:,.0f} | "
            f"{'-' if forced != forced else f'{forced:,.0f}'} | {py:,.0f} | {mxs} | {best / py:.0f} "
            f"| {mxr} | {mxa} | {l0:.1f}-{l1:.1f} |"
        )
    lines.append("")
    comp_txt = ", ".join(f"{k} cache {v:.2f} s" for k, v in comp.items())
    mx_comp = [f"{r[5][0]:.1f} s" for r in rows if r[5]]
    lines.append(
        f"Compilation, numba (fresh process: import + first call of every kernel): {comp_txt}. "
        + (
            f"mctx first call per shape (jit compile, or load from JAX's persistent cache "
            f"when warm): {', '.join(mx_comp)}."
            if mx_comp
            else ""
        )
    )
    r = next((r for r in rows if r[:3] == (1024, 256, 8)), None)
    if r is not None:
        best = _best(r[3], r[7])
        xp, xm = best / r[4], (best / r[5][1] if r[5] else float("nan"))
        xa = max(r[3].values()) / r[5][1] if r[5] else float("nan")
        verdict = "met" if xp >= 100 and xm >= 30 else "NOT met"
        lines.append(
            f"Bar (B=1024, S=256, K=8: >= 100x plain Python and >= 30x mctx) in this run: "
            f"{verdict} ({xp:.0f}x Python, {xm:.1f}x mctx; default threads=auto {xa:.1f}x)."
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(text)
    B, S, K, rates, py, mx, _, forced = next(r for r in rows if r[:3] == (1024, 256, 8))
    best = _best(rates, forced)
    mx_txt = (
        f"{best / mx[1]:.1f}x mctx (auto {max(rates.values()) / mx[1]:.1f}x)"
        if mx
        else "mctx not installed"
    )
    print(f"B=1024 S=256 K=8: numba {best:,.0f} sims/s = {best / py:.0f}x plain Python, {mx_txt}")


if __name__ == "__main__":
    main()
