"""Our node against mlx-lm's own batching server: same model, same prompts, one run.

    .venv/bin/python -m bench.batching [--out docs/benchmarks/batching-DATE.json]
    .venv/bin/python -m bench.batching --quick        # rounds 1, agents 2, turns 2, c = 1, 4

Why: the issue "a node that serves many requests at once". Its goals, measured here:
our node reaches >= 90% of ``mlx_lm.server``'s aggregate tokens/s at concurrency 1 and
>= 110% at concurrency 8; with several coding agents at once, our wall time and follow-up
time to first token are no worse than ``mlx_lm.server``'s.

Both systems serve the default model directory (SmolLM2-135M-Instruct) on loopback:
``mlx-stack up`` (gateway + broker + worker, model "standard") and ``python -m
mlx_lm.server --decode-concurrency 8 --prompt-concurrency 8`` (model "default_model"). On
Linux both use the system OpenBLAS: our worker loads it itself (worker.blas), the baseline
gets it through LD_PRELOAD; the libraries each process really mapped are recorded.

1. concurrency: at each level c, c streamed chat requests leave at once, each with a
   different short prompt (temperature 0, --max-tokens), for --rounds rounds. Aggregate
   tokens/s = tokens received / wall time (first request sent -> last stream ended), the
   tokens counted by tokenizing the received text with the model's tokenizer (the
   servers' usage figures are only recorded, not trusted); TTFT (request sent -> first
   non-empty content) p50 and max.
2. agents: --agents conversations at once, each a ~2,000-token system prompt (a made-up
   project handbook, distinct per agent) and --turns short user turns; every turn sends
   the whole history again, as coding agents do. Wall time of the phase, first-turn and
   follow-up-turn TTFT p50/max, tokens received.

Only one system is under load at a time (the other idles); which one goes first
alternates from one level to the next, and the agents phase starts with the system that
went second last. Ratios are ours / mlx_lm_server. JSON goes to stdout (and --out),
progress to stderr. Both servers are stopped on exit, error, Ctrl-C or SIGTERM.

This module is the command, the phases, the summaries and the report; the rest lives in
modules named for what they hold (each under 400 lines): the servers' processes in
``bench.batching_servers``, the prompts and handbooks in ``bench.batching_prompts``, the
streamed requests in ``bench.batching_requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from bench.batching_prompts import TURNS, handbook, story_prompt
from bench.batching_requests import Reply, agents_at_once, burst
from bench.batching_servers import (
    STOP_SIGNALS,
    Server,
    mapped_blas,
    resolve_library,
    running,
    wait_ready,
    worker_pid,
)
from bench.routing import provenance
from mlx_stack.common.config import Settings
from mlx_stack.worker.blas import preload_openblas
from mlx_stack.worker.default_model import DEFAULT_MODEL_ID, ensure_default_model
from testkit.harness import free_port

OURS, BASE = "ours", "mlx_lm_server"


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[batching {stamp}] {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- summaries


def ms(seconds: list[float], how: Callable[[list[float]], float]) -> float | None:
    return round(how(seconds) * 1000, 1) if seconds else None


def ratio(ours: float | None, base: float | None) -> float | None:
    return round(ours / base, 4) if ours is not None and base else None


def errors_of(replies: list[Reply]) -> dict[str, Any]:
    failed = [r.error for r in replies if r.error]
    return {"errors": len(failed), **({"first_error": failed[0]} if failed else {})}


def usage_sum(replies: list[Reply]) -> int | None:
    counts = [r.usage_tokens for r in replies]
    return None if None in counts else sum(c for c in counts if c is not None)


def flat(groups: list[list[Reply]]) -> list[Reply]:
    return [r for group in groups for r in group]


def level_summary(rounds: list[list[Reply]], count: Callable[[str], int]) -> dict[str, Any]:
    walls = [max(r.end for r in rr) - min(r.sent for r in rr) for rr in rounds]
    tokens = [sum(count(r.text) for r in rr) for rr in rounds]
    replies = flat(rounds)
    ttfts = [r.ttft for r in replies if r.ttft is not None and not r.error]
    return {
        "requests": len(replies), **errors_of(replies),
        "wall_s": round(sum(walls), 3),
        "tokens_received": sum(tokens),
        "tokens_per_s": round(sum(tokens) / sum(walls), 2),
        "round_tokens_per_s": [round(t / w, 2) for t, w in zip(tokens, walls, strict=True)],
        "ttft_ms_p50": ms(ttfts, statistics.median), "ttft_ms_max": ms(ttfts, max),
        "usage_completion_tokens": usage_sum(replies),
    }


def agents_summary(convs: list[list[Reply]], count: Callable[[str], int]) -> dict[str, Any]:
    replies = flat(convs)
    wall = max(r.end for r in replies) - min(r.sent for r in replies)
    tokens = sum(count(r.text) for r in replies)
    first = [c[0].ttft for c in convs if c and c[0].ttft is not None and not c[0].error]
    later = [r.ttft for c in convs for r in c[1:] if r.ttft is not None and not r.error]
    return {
        "requests": len(replies), **errors_of(replies),
        "wall_s": round(wall, 3), "tokens_received": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "first_turn_ttft_ms_p50": ms(first, statistics.median),
        "first_turn_ttft_ms_max": ms(first, max),
        "followup_ttft_ms_p50": ms(later, statistics.median),
        "followup_ttft_ms_max": ms(later, max),
        "usage_completion_tokens": usage_sum(replies),
    }


def same_texts(ours: list[Reply], base: list[Reply]) -> str:
    """How many paired requests got the very same text (greedy: they should)."""
    same = sum(a.text == b.text for a, b in zip(ours, base, strict=True))
    return f"{same}/{len(ours)}"


# ---------------------------------------------------------------- phases


def concurrency_phase(servers: dict[str, Server], levels: list[int], rounds: int,
                      max_tokens: int, timeout: float,
                      count: Callable[[str], int]) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    order: list[str] = []
    next_prompt = 0
    for i, level in enumerate(levels):
        order = [OURS, BASE] if i % 2 == 0 else [BASE, OURS]
        prompts = [[story_prompt(next_prompt + r * level + k) for k in range(level)]
                   for r in range(rounds)]
        next_prompt += rounds * level
        runs: dict[str, list[list[Reply]]] = {}
        for name in order:
            log(f"concurrency {level}: {name}, {rounds} round(s) of {level} request(s)")
            runs[name] = [asyncio.run(burst(servers[name], batch, max_tokens, timeout))
                          for batch in prompts]
        row = {name: level_summary(runs[name], count) for name in (OURS, BASE)}
        out[str(level)] = {
            "order": order, **row,
            "ratio_tokens_per_s": ratio(row[OURS]["tokens_per_s"], row[BASE]["tokens_per_s"]),
            "ratio_ttft_p50": ratio(row[OURS]["ttft_ms_p50"], row[BASE]["ttft_ms_p50"]),
            "same_text": same_texts(flat(runs[OURS]), flat(runs[BASE])),
        }
    return out, order


def agents_phase(servers: dict[str, Server], systems: list[str], order: list[str],
                 turns: int, max_tokens: int, timeout: float,
                 count: Callable[[str], int]) -> dict[str, Any]:
    runs: dict[str, list[list[Reply]]] = {}
    for name in order:
        log(f"agents: {name}, {len(systems)} agents x {turns} turns")
        runs[name] = asyncio.run(agents_at_once(servers[name], systems, turns, max_tokens,
                                                timeout))
    row = {name: agents_summary(runs[name], count) for name in (OURS, BASE)}
    return {
        "order": order, **row,
        "ratio_wall": ratio(row[OURS]["wall_s"], row[BASE]["wall_s"]),
        "ratio_followup_ttft_p50": ratio(row[OURS]["followup_ttft_ms_p50"],
                                         row[BASE]["followup_ttft_ms_p50"]),
        "ratio_first_turn_ttft_p50": ratio(row[OURS]["first_turn_ttft_ms_p50"],
                                           row[BASE]["first_turn_ttft_ms_p50"]),
        "same_text": same_texts(flat(runs[OURS]), flat(runs[BASE])),
    }


# ---------------------------------------------------------------- report


def versions() -> dict[str, Any]:
    return {"mlx_lm": importlib.metadata.version("mlx-lm"),
            "mlx": importlib.metadata.version("mlx"), "python": platform.python_version()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--quick", action="store_true",
                        help="rounds 1, agents 2, turns 2, levels 1 and 4")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--agent-max-tokens", type=int, default=48)
    parser.add_argument("--system-tokens", type=int, default=2000,
                        help="size of each agent's system prompt, in tokens")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds one request may take from send to end of stream")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.agents, args.turns, args.levels = 1, 2, 2, [1, 4]
    counts = (*args.levels, args.rounds, args.max_tokens, args.agents, args.turns,
              args.agent_max_tokens, args.system_tokens)
    if min(counts) < 1 or args.request_timeout <= 0:
        parser.error("levels, rounds, agents, turns, token counts and timeout must be >= 1")
    return args


def start_servers(stack: contextlib.ExitStack, model_path: Path, tmp: Path,
                  blas: str | None) -> tuple[dict[str, Server], dict[str, Any]]:
    """Both systems, loading at the same time; returns them once each has answered."""
    base_port, our_port = free_port(), free_port()
    base_argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_path),
                 "--host", "127.0.0.1", "--port", str(base_port),
                 "--decode-concurrency", "8", "--prompt-concurrency", "8"]
    base_env = {**os.environ, **({"LD_PRELOAD": blas} if blas else {})}
    our_argv = [sys.executable, "-m", "mlx_stack.cli", "up", "--port", str(our_port),
                "--broker-port", str(free_port())]
    our_env = {**os.environ, "MLX_STACK_HOME": str(tmp / "home"),
               "MLX_STACK_MODELS_DIR": str(model_path.parent)}
    our_env.pop("LD_PRELOAD", None)
    servers = {}
    for name, argv, env, model, port in ((BASE, base_argv, base_env, "default_model",
                                          base_port),
                                         (OURS, our_argv, our_env, "standard", our_port)):
        log(f"starting {name}: {' '.join(argv[1:])}")
        proc = stack.enter_context(running(argv, env, tmp / f"{name}.log"))
        servers[name] = Server(name, f"http://127.0.0.1:{port}", model, proc,
                               tmp / f"{name}.log")
    for server in servers.values():
        wait_ready(server)
        log(f"{server.name} is ready at {server.url}")
    setup = {"argv": {BASE: base_argv, OURS: our_argv},
             "request_model": {name: s.model for name, s in servers.items()},
             "baseline_ld_preload": base_env.get("LD_PRELOAD")}
    return servers, setup


def warm(servers: dict[str, Server], timeout: float) -> None:
    for server in servers.values():
        log(f"warming {server.name}")
        replies = asyncio.run(burst(server, ["Name three colours."], 16, timeout))
        if replies[0].error:
            raise RuntimeError(f"{server.name} failed its warm-up: {replies[0].error}")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model_path = ensure_default_model(Settings.load().models_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    systems = [handbook(a, args.system_tokens, count) for a in range(args.agents)]
    blas = resolve_library(preload_openblas())
    with contextlib.ExitStack() as stack:
        servers, setup = start_servers(stack, model_path, tmp, blas)
        warm(servers, args.request_timeout)
        our_worker = worker_pid(servers[OURS].proc)
        mapped = {BASE: mapped_blas(servers[BASE].proc.pid),
                  OURS: mapped_blas(our_worker) if our_worker else None}
        concurrency, last = concurrency_phase(servers, args.levels, args.rounds,
                                              args.max_tokens, args.request_timeout, count)
        agents = agents_phase(servers, systems, last[::-1], args.turns,
                              args.agent_max_tokens, args.request_timeout, count)
        log("stopping both systems")
    first_prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": systems[0]}, {"role": "user", "content": TURNS[0]}],
        tokenize=False, add_generation_prompt=True)
    return {
        "benchmark": "batching",
        **provenance(),  # date, commit, changed files, machine
        "blas": {"system_openblas": blas, "mapped": mapped,
                 OURS: "worker.blas.preload_openblas (dlopen before mlx)",
                 BASE: f"LD_PRELOAD={blas}" if blas else "bundled"},
        "versions": versions(),
        "model": {"id": DEFAULT_MODEL_ID, "path": str(model_path)},
        "settings": {
            "levels": args.levels, "rounds": args.rounds, "max_tokens": args.max_tokens,
            "agents": args.agents, "turns": args.turns,
            "agent_max_tokens": args.agent_max_tokens, "temperature": 0,
            "system_prompt_tokens": [count(s) for s in systems],
            "first_turn_prompt_tokens_agent_0": count(first_prompt),
            "request_timeout_s": args.request_timeout,
            "tokens_counted_by": "model tokenizer on the received text",
            **setup,
        },
        "concurrency": concurrency,
        "agents": agents,
    }


def main() -> None:
    args = parse_args()
    for sig in STOP_SIGNALS[1:]:
        signal.signal(sig, _interrupt)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-batching-"))
    try:
        report = run(args, tmp)
    except KeyboardInterrupt:
        log(f"interrupted; both systems stopped, their logs kept in {tmp}")
        sys.exit(130)
    except BaseException:
        log(f"failed; both systems stopped, their logs kept in {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    report["duration_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    log(f"done in {report['duration_s']} s")


if __name__ == "__main__":
    main()
