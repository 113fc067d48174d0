"""The chaos run of issue 28 over several seeds, printed as JSON and written beside the
benchmark pages.

    python -m bench.chaos [--runs 3] [--seed 20261207] [--streams 500] [--out PATH]

Needs root, iproute2 and nftables (network namespaces and packet loss), as the tests in
network namespaces do; without them it stops at once and says why.

Each run is ``testkit.chaos.run_chaos``, the scenario tests/test_chaos_hosts.py asserts,
with seed S, S+1, ... (the first is the test's): three hosts (netns on a bridge, found
over mDNS), node-c still on the previous protocol; 5% packet loss on node-b's link; two
workers SIGKILLed, one SIGSTOPped for 2 s, the standby broker and then the coordinator's
SIGKILLed and started again, at moments the seed draws; an engine step error in every
100th stream; the streams (40 tokens at 25 tokens/s, 120 at a time) through the three
gateways. Per run: streams ok, failed, wrong text, sent again before any response, each
fault with when it struck and how many streams were live, step errors logged, a stream's
time (p50 / p90 / max) and the longest wait between two chunks of any stream. A run that
could not finish (the mesh did not come up, streams still open after 240 s) is reported
with its error and its logs' directory, not left out. The summary pools the runs.

The JSON goes to stdout and to --out (default docs/benchmarks/chaos-DATE.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.routing import pct, provenance
from testkit import chaos, netns
from testkit.harness import ROOT
from testkit.netns import HostMesh
from testkit.scenarios import NODES


def one_run(tmp: Path, seed: int, streams: int) -> tuple[dict[str, Any], list[float]]:
    """One chaos run: its report, and every ok stream's time (pooled in the summary).
    Its logs are kept in ``tmp`` when anything failed, else removed."""
    with netns.Hosts(NODES) as hosts:
        mesh = HostMesh(tmp, hosts)
        try:
            result = chaos.run_chaos(mesh, seed=seed, streams=streams)
        except Exception as exc:  # a run that could not finish is a figure too
            return {"seed": seed, "streams": streams, "error": f"{type(exc).__name__}: {exc}",
                    "logs": str(tmp)}, []
        finally:
            mesh.close()
    report = {**asdict(result), "faults_struck": result.faults_struck}
    del report["stream_seconds"]
    if result.failed or result.wrong or result.faults_struck < len(result.faults):
        report["logs"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return report, result.stream_seconds


def summary(runs: list[dict[str, Any]], seconds: list[float]) -> dict[str, Any]:
    """The runs pooled: counts summed, stream times over every ok stream of every run."""
    finished = [r for r in runs if "error" not in r]
    return {
        "runs": len(runs), "runs_that_raised": len(runs) - len(finished),
        "streams": sum(r["streams"] for r in runs),
        "ok": sum(r["ok"] for r in finished),
        "failed": sum(len(r["failed"]) for r in finished),
        "wrong": sum(len(r["wrong"]) for r in finished),
        "retried": sum(r["retried"] for r in finished),
        "faults": sum(len(r["faults"]) for r in finished),
        "faults_struck": sum(r["faults_struck"] for r in finished),
        "step_errors": sum(r["step_errors"] for r in finished),
        "stream_p50_s": round(pct(seconds, 0.5), 3) if seconds else None,
        "stream_p90_s": round(pct(seconds, 0.9), 3) if seconds else None,
        "stream_max_s": round(max(seconds), 3) if seconds else None,
        "max_stall_s": max((r["max_stall_s"] for r in finished), default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Needs root, iproute2 and nftables (network namespaces, packet loss).")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=chaos.SEED,
                        help="the first run's seed; the next runs take the next integers")
    parser.add_argument("--streams", type=int, default=chaos.STREAMS)
    parser.add_argument("--out", type=Path, help="also write the JSON to this file "
                        "(default docs/benchmarks/chaos-DATE.json)")
    args = parser.parse_args()
    if why := chaos.unavailable():
        parser.error(f"the chaos run needs root, iproute2 and nftables: {why}")
    if args.runs < 1 or args.streams < 1:
        parser.error("--runs and --streams must be at least 1")
    out = args.out or ROOT / "docs" / "benchmarks" / f"chaos-{datetime.date.today()}.json"
    info = provenance()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-chaos-"))
    runs, seconds = [], []
    for i in range(args.runs):
        report, times = one_run(tmp / f"run-{i}", args.seed + i, args.streams)
        runs.append(report)
        seconds += times
        print(f"run {i + 1} of {args.runs} (seed {args.seed + i}): "
              f"{report.get('error') or report['ok']} ok", file=sys.stderr)
    text = json.dumps({
        "benchmark": "chaos",
        "command": " ".join(["python -m bench.chaos", *sys.argv[1:]]), **info,
        "scenario": {"hosts": list(NODES), "older_protocol_host": "node-c",
                     "loss": f"{chaos.LOSS_PERCENT}% on node-b's link",
                     "tokens_per_stream": chaos.TOKENS, "concurrency": chaos.CONCURRENCY,
                     "worker_rate_tokens_per_s": chaos.RATE, "workers_slots": chaos.SLOTS,
                     "stop_s": chaos.PAUSE_S, "step_error_every": 100},
        "runs": runs, "summary": summary(runs, seconds)}, indent=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
