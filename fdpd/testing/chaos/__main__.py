"""The chaos suite's command line, ``python -m fdpd.testing.chaos`` (``scripts/chaos``): runs
random seeded scenarios (or replays one, ``FDPD_CHAOS_SEED``) and writes the table."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from fdpd.testing.chaos.report import summary_rows, write_report
from fdpd.testing.chaos.runner import ChaosRunner, RunResult
from fdpd.testing.chaos.scenarios import CHOSEN, random_scenario


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdpd.testing.chaos", description="Run random seeded chaos scenarios "
        "against a local cluster and write the reliability table.")
    parser.add_argument("--runs", type=int, default=50, help="random scenarios to run")
    parser.add_argument("--seed", type=int, default=None,
                        help="base seed (default: from the clock); run i uses seed+i")
    parser.add_argument("--chosen", action="store_true",
                        help="also run the chosen scenarios of the CI suite first")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--log-dir", default=None, help="keep the cluster logs here")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    args = parser.parse_args(argv)
    replay = os.environ.get("FDPD_CHAOS_SEED")
    if replay:
        scenarios = [random_scenario(int(replay))]
        base = int(replay)
    else:
        base = args.seed if args.seed is not None else int(time.time()) % 1_000_000
        scenarios = [*(CHOSEN if args.chosen else ()),
                     *(random_scenario(base + i) for i in range(args.runs))]
    print(f"chaos: {len(scenarios)} scenarios, base seed {base}", flush=True)
    t0 = time.monotonic()
    results: list[RunResult] = []
    with ChaosRunner(args.log_dir) as runner:
        for i, sc in enumerate(scenarios):
            print(f"[{i + 1}/{len(scenarios)}] ", end="", flush=True)
            results.append(runner.run(sc))
    wall = time.monotonic() - t0
    for kind, row in summary_rows(results):
        print(f"{kind:48s} " + " ".join(f"{v!s:>6}" for v in row))
    if args.out:
        command = f"scripts/chaos --runs {args.runs} --seed {base}" + (
            " --chosen" if args.chosen else "")
        write_report(results, args.out, command=command, base_seed=base, date=args.date,
                     machine=args.machine, wall_seconds=wall)
        print(f"chaos: wrote {args.out}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
