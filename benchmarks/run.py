"""Run every ``benchmarks/bench_*.py`` and write ``benchmarks/RESULTS.md`` (plus CSVs).

Each module defines ``run(quick: bool = False) -> pandas.DataFrame``: one row per measured case,
with a ``ratio`` column against the naive implementation timed in the same run.

    python -m benchmarks.run            # full
    python -m benchmarks.run --quick    # smoke run, seconds
    python -m benchmarks.run sweep      # only bench_sweep.py
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from pathlib import Path

from bnn_tol.provenance import describe, environment

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmark names (bench_<name>.py); default all")
    ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown output")
    args = ap.parse_args(argv)
    names = args.names or sorted(p.stem[6:] for p in HERE.glob("bench_*.py"))
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    env = environment(command="make bench" if not args.quick else "python -m benchmarks.run "
                      "--quick")
    lines = ["# Benchmark results", "",
             f"{time.strftime('%Y-%m-%d %H:%M')} · {describe(env)} · "
             f"{'quick' if args.quick else 'full'} run", ""]
    failed = 0
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            df = mod.run(quick=args.quick)
        except Exception:  # report and go on with the other benchmarks
            failed += 1
            lines += [f"## {name}", "", "```", traceback.format_exc(), "```", ""]
            traceback.print_exc()
            continue
        df.to_csv(results_dir / f"{name}.csv", index=False)
        table = df.to_markdown(index=False, floatfmt=".4g")
        print(table, flush=True)
        doc = (mod.__doc__ or "").strip()
        lines += [f"## {name}", "", doc, "", table, "",
                  f"_{time.perf_counter() - t0:.0f} s_", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
