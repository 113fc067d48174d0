"""bench.agents with the real model: agents through one gateway, cache routing against
load-only routing and one node alone, each worker running the default model through
mlx-lm (its own prompt cache, its own prefill), printed as JSON.

    .venv/bin/python -m bench.agents_model [--agents 6] [--turns 4] [--system-bytes 6000]

The same agents and meshes as ``bench.agents`` (its module docstring says how they run),
with ``mlx-stack worker --model default=syn`` on every node instead of the synthetic
engine, at temperature 0. What it shows on a machine without a GPU: where the follow-ups
go, how much of their prompts mlx-lm's own counters say came from its cache, and their
time to first token. What it cannot show here: throughput across nodes, since the three
"nodes" share the machine's cores (on two cores three workers are no faster than one),
so issue 27's tokens/s goal is left to ``bench.agents``. Every answer is compared with
the one-node run's answer to the same prompt (``inexact_streams``): a conversation
resumed from a cache on another node must read the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.agents import NODES, Workload, run_agents, start_mesh
from bench.routing import provenance
from mlx_stack.common.config import Settings
from mlx_stack.worker.default_model import ensure_default_model

SLOTS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-bytes", type=int, default=6_000,
                        help="each agent's own system prompt (~1,500 tokens)")
    parser.add_argument("--tool-bytes", type=int, default=800)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--tool-seconds", type=float, default=0.3)
    args = parser.parse_args()
    workload = Workload(args.agents, args.turns, args.system_bytes, args.tool_bytes,
                        args.answer_tokens, args.tool_seconds)
    models_dir = Settings.load().models_path
    ensure_default_model(models_dir)
    env = {"MLX_STACK_MODELS_DIR": str(models_dir)}
    worker_args = ["--model", "default=syn", "--slots", str(SLOTS)]
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-bench-agents-model-"))
    report: dict[str, Any] = {
        "benchmark": "agents_model", "command": "python -m bench.agents_model " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        **provenance(), "workload": asdict(workload),
        "workers": {"engine": "mlx (the default model)", "slots": SLOTS}, "gateway": NODES[0]}
    answers: dict[str, str] = {}
    for name, nodes, cache_routing in (("one_node", NODES[:1], True),
                                       ("cache_routing", NODES, True),
                                       ("load_only", NODES, False)):
        mesh = start_mesh(tmp / name, nodes, worker_args, cache_routing, env)
        try:
            report[name] = run_agents(mesh, workload, answers)
        finally:
            mesh.cluster.close()
    on, off = report["cache_routing"]["follow_ups"], report["load_only"]["follow_ups"]
    report["cache_routing_vs_load_only"] = {
        **{f"follow_up_ttft_{q}": round(on["ttft_ms"][q] / off["ttft_ms"][q], 3)
           for q in ("p50", "p90")},
        "follow_up_prompt_tokens_computed": round(
            on["prompt_tokens_computed"] / off["prompt_tokens_computed"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
