"""What caching buys: a first run, a re-run with the same inputs, and a re-run after changing only a gate
threshold, each a real `olivepress run` in its own process, side by side in one session.

Writes JSON and prints wall times, their ratio to the first run, and each step's status per run:

    .venv/bin/python benchmarks/cache_rerun.py --out benchmarks/results/cache_rerun.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def olivepress_run(config_file: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "olivepress.flows.cli", "run", "--config", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )
    return time.perf_counter() - started


def latest_summary(runs: Path) -> dict[str, str]:
    run_dir = max(runs.glob("run-*"), key=lambda p: p.stat().st_mtime)
    return {row["step"]: row["status"] for row in json.loads((run_dir / "summary.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="JSONL (default: the shipped sample)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-cache-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cache_rerun.json"))
    parser.add_argument("--max-steps", type=int, default=60)
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base = {
        "output": str(args.work / "runs"),
        "registry": {"path": str(args.work / "registry")},
        "store": {"cache_dir": str(args.work / "cache")},
        "finetune": {"max_steps": args.max_steps},
    }
    if args.data:
        base["data"] = str(args.data.resolve())
    changed_gate = {**base, "gate": {"max_size_ratio": 0.45}}
    scenarios = [("first run", base), ("same inputs", base), ("gate threshold changed", changed_gate)]

    results = []
    for name, config in scenarios:
        config_file = args.work / f"{len(results)}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        seconds = olivepress_run(config_file, args.work / f"{len(results)}.log")
        results.append(
            {"run": name, "seconds": round(seconds, 1), "steps": latest_summary(args.work / "runs")}
        )
        print(f"{name}: {seconds:.1f} s", flush=True)
    for row in results:
        row["ratio_to_first"] = round(row["seconds"] / results[0]["seconds"], 3)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"data": str(args.data or "shipped sample"), "cpu_count": os.cpu_count(), "runs": results},
            indent=1,
        )
    )
    steps = list(results[0]["steps"])
    print(f"\n{'run':<24} {'wall s':>8} {'× first':>8}  " + " ".join(f"{s:>9}" for s in steps))
    for row in results:
        cells = " ".join(f"{row['steps'].get(s, '-'):>9}" for s in steps)
        print(f"{row['run']:<24} {row['seconds']:>8.1f} {row['ratio_to_first']:>8.3f}  {cells}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
