"""The mesh against LiteLLM's proxy, side by side in one run, printed as JSON, with plots.

    .venv/bin/python -m bench.vs_litellm [--out docs/benchmarks]

Three synthetic backends with the same timing (20 ms to the first token, 50 tokens/s per
stream, 32 slots each) serve behind each router:
- ``http``: one backend called directly over HTTP (``bench/http_backend.py``): the
  baseline both routers are compared with;
- ``mesh``: our broker and gateway with three synthetic workers of that timing;
- ``litellm-shuffle`` and ``litellm-least-busy``: LiteLLM's proxy (pinned
  :data:`bench.vs_litellm_systems.LITELLM`, in a virtual environment this script creates
  once under ``~/.cache/mlx-stack/``, telemetry off, loopback only) over three HTTP
  backends, with those two routing strategies and retries on (``num_retries: 3``;
  cooldowns left at LiteLLM's defaults).

Phases, each on fresh processes:
1. added time to first token, p50 and p99, at concurrency 1 (200 streams) and 32 (2,880:
   a p99 of 960 was the tenth-slowest stream, and the baseline's own moved from 88 to
   118 ms between runs; 3,840 took the script past 10 minutes), over ``http`` measured
   in the same minutes: at concurrency 1 the streams alternate between the router and
   ``http`` (after 20 to each to warm up), at 32 they take turns in six rounds of 480,
   each round's first 32 starting spread over one stream's length
   (:data:`bench.vs_litellm_phases.STREAM_S`): a steady load of 32. (On this VM the
   baseline alone drifted by 0.4 ms between two runs, more than the mesh adds. Started
   all at once, streams of one length stay in step, and every stream of the round came
   in a burst of 32; the burst phase measures that.) The load process collects no
   garbage while it measures (``bench.routing.quiet_heap``): its own pauses were the
   slowest 1% of every system.
2. the streamed tokens/s ceiling through the router at concurrency 96 (every slot), and
   the router's CPU seconds per 1,000 tokens (its processes' user + system time);
3. balance: a simultaneous burst of 60 long streams; how many each backend started, and
   their time to first token (how fast the router takes in a burst);
4. failures: under 30 streams, one backend (mesh: one worker) is SIGKILLed once all
   flow; then a second one is killed while idle and 30 more streams are sent. Each
   stream is completed (its exact text), failed (an error), hung (no end in 60 s),
   or wrong (ended, but with repeated or lost tokens).

Every process started here is stopped at the end, also on failure. The JSON (date,
commit, machine, versions of both systems, and issue 13's goals, each met or not in this
run: ``goals``) goes to stdout and ``<out>/vs-litellm.json``;
the plots to ``<out>/vs-litellm-*.png``.

This module is the command; the parts live in modules named for what they hold (each
under 400 lines): the systems compared and their timing in ``bench.vs_litellm_systems``,
the four phases in ``bench.vs_litellm_phases``, the ratios, goals and plots in
``bench.vs_litellm_report``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.routing import provenance
from bench.vs_litellm_phases import run_all
from bench.vs_litellm_report import PLOT, goals, ratios
from bench.vs_litellm_systems import BACKENDS, RATE, SLOTS, TOKENS, TTFT, comparison_venv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    info = provenance()
    python = comparison_venv()
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              "print(m.version('litellm'))"], capture_output=True, text=True,
                             check=True).stdout.strip()
    started = time.monotonic()
    results = run_all(Path(tempfile.mkdtemp(prefix="mlxs-vs-litellm-")))
    report = {"benchmark": "vs_litellm", "command": ".venv/bin/python -m bench.vs_litellm",
              **info, "litellm": version,
              "engine": {"ttft_s": TTFT, "rate_tokens_per_s": RATE, "slots": SLOTS,
                         "backends": BACKENDS, "tokens_per_request": TOKENS},
              "seconds": round(time.monotonic() - started, 1), "results": results,
              "ratios": ratios(results)}
    report["goals"] = goals(results, report["ratios"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vs-litellm.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    subprocess.run([str(python), "-c", PLOT, str(path), str(args.out)], check=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
