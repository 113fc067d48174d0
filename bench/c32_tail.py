"""Issue 13's concurrency-32 goal alone, in under a minute, printed as JSON: where the
mesh's slowest first tokens come from.

    .venv/bin/python -m bench.c32_tail [--workers 3] [--gateways 1] [--repeat 1] [--out F]

``bench.vs_litellm`` measures it among everything else, in 8 minutes. This measures only
it, the same way (:func:`bench.vs_litellm_phases.steady`: the mesh and the HTTP baseline
take turns at a steady concurrency of 32, six rounds of 480 streams each), and adds what
each process spent: CPU milliseconds per stream it served (user + system, over the whole
run: the mesh's idle heartbeats during the baseline's turns included). The goal is met
when the mesh's p99 time to first token is at most 1.1 times the baseline's.

The mesh's shape is a flag, to test what the tail depends on: ``--workers 1`` (one
worker, as the baseline is one server), ``--gateways 2`` (the load spread over two
gateways, as several gateway processes would share it). ``--repeat`` runs the measure
again on the same processes: on a shared VM one run is one sample of a drifting machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.routing import Streamed, load, provenance
from bench.vs_litellm_phases import ROUND_STREAMS, ROUNDS, steady, ttft_ms
from bench.vs_litellm_report import C32_GOAL
from bench.vs_litellm_systems import BACKENDS, RATE, SLOTS, TOKENS, TTFT, Systems, cpu
from testkit.harness import Proc


def measure(urls: list[str], base: str, procs: dict[str, list[Proc]]) -> dict[str, Any]:
    """One steady run of both systems: their time to first token and each process
    group's CPU per stream it served."""
    before = {name: cpu(group) for name, group in procs.items()}
    runs = steady({"mesh": urls, "baseline": [base]})
    served = ROUNDS * ROUND_STREAMS
    ttft = {name: {f"ttft_ms_p{q}": ttft_ms(r, q / 100) for q in (50, 90, 99)}
            for name, r in runs.items()}
    ratio = ttft["mesh"]["ttft_ms_p99"] / ttft["baseline"]["ttft_ms_p99"]
    return {**ttft, "p99_over_baseline": round(ratio, 3), "goal_met": ratio <= C32_GOAL,
            "cpu_ms_per_stream": {name: round((cpu(group) - before[name]) / served * 1000, 3)
                                  for name, group in procs.items()}}


def warm(urls: list[str]) -> list[Streamed]:
    return asyncio.run(load(urls, 64, 32, TOKENS))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=BACKENDS,
                        help=f"synthetic workers in the mesh (default {BACKENDS})")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateways the mesh's load is spread over (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="runs on the same processes")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "c32_tail", "command": " ".join(["python -m bench.c32_tail",
                                                      *sys.argv[1:]]),
        **provenance(), "engine": {"ttft_s": TTFT, "rate_tokens_per_s": RATE, "slots": SLOTS,
                                   "tokens_per_request": TOKENS},
        "mesh": {"workers": args.workers, "gateways": args.gateways},
        "streams_per_system": ROUNDS * ROUND_STREAMS}
    with tempfile.TemporaryDirectory() as tmp:
        systems = Systems(Path(tmp))
        try:
            base, backend = systems.backend()
            _, urls, router, workers = systems.mesh(args.workers, args.gateways)
            warm(urls)
            warm([base])
            procs = {"gateways": router[1:], "broker": router[:1], "workers": workers,
                     "baseline": [backend]}
            report["runs"] = [measure(urls, base, procs) for _ in range(args.repeat)]
        finally:
            systems.close()
    report["goal_met_in"] = f"{sum(r['goal_met'] for r in report['runs'])} of {args.repeat}"
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
