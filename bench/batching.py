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
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import psutil

from bench.one_node import wait_healthy
from bench.routing import provenance
from mlx_stack.common.config import Settings
from mlx_stack.worker.blas import preload_openblas
from mlx_stack.worker.default_model import DEFAULT_MODEL_ID, ensure_default_model
from testkit.harness import free_port
from testkit.sse import ChatStream, read_chat

ROOT = Path(__file__).resolve().parent.parent
OURS, BASE = "ours", "mlx_lm_server"
READY_TIMEOUT = 300.0
STOP_GRACE = 20.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

TOPICS = [
    "a lighthouse keeper", "a lost robot", "a dragon who hates fire", "a city under the sea",
    "a time-travelling cat", "the last tree on Mars", "a haunted library", "a chess prodigy",
    "a baker who bakes dreams", "a talking river", "an astronaut's first day",
    "a map that redraws itself", "a shy volcano", "a detective penguin",
    "a garden on a train", "a clock that runs backwards",
]
FORMS = ["short story", "short poem", "fable", "bedtime story"]

AREAS = ["billing", "search", "auth", "storage", "scheduler", "metrics", "importer", "CLI"]
THINGS = ["the release pipeline", "the public API", "the database schema", "the config loader",
          "the job queue", "the web dashboard", "the nightly export", "the cache layer"]
TAGS = ["flaky-test", "tech-debt", "needs-design", "security", "perf", "docs"]
RULES = [
    "Every change to the {area} module comes with a test that fails without it; agent-{a} "
    "runs the whole test suite before asking for review.",
    "Never log tokens, passwords or customer e-mail addresses from {thing}; when a value may "
    "be sensitive, log its length only.",
    "A function longer than {n} lines is split before review, and each part gets a "
    "docstring that says why it exists, not what it does.",
    "The {area} team owns {thing}; agent-{a} asks them before changing its interface and "
    "links their answer in the pull request.",
    "Releases of {thing} happen on day {day} of each month; anything not reviewed by "
    "{hour}:00 that day waits for the next release.",
    "Calls to {thing} are retried at most {n} times with exponential backoff starting at "
    "{ms} ms, and every retry is counted in the metrics.",
    "A new setting of the {area} module gets a default, a comment and a changelog line; "
    "settings nobody has read for {n} months are removed.",
    "When a test of the {area} module is flaky, agent-{a} opens an issue tagged {tag} "
    "instead of retrying it in continuous integration.",
    "Pull requests touching {thing} stay under {n}00 changed lines; larger work is split "
    "into steps that each keep the build green.",
    "Errors shown to users of {thing} say what happened and what to do next; stack traces "
    "go to the log, never to the screen.",
    "Dependencies of the {area} module are pinned; agent-{a} upgrades them in a separate "
    "pull request tagged {tag} with the changelog of each package.",
    "Before a migration of {thing}, take a backup, rehearse on a copy and write the "
    "rollback steps in the ticket; migrations never run on day {day}.",
]
TURNS = [
    "Which rule says what to do before asking for review? Answer in one sentence.",
    "Summarise the rules about retries and errors in two sentences.",
    "Write a one-line commit message for a fix to the config loader.",
    "What do you do first when a test becomes flaky?",
    "Which team should you ask before changing the public API?",
    "List three rules you would check before a release.",
]


@dataclass
class Server:
    """One system under test: where to reach it, the model name it answers to."""

    name: str
    url: str
    model: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Reply:
    """One streamed chat completion as the client saw it (perf_counter seconds)."""

    sent: float
    end: float
    ttft: float | None
    text: str
    usage_tokens: int | None
    error: str | None = None


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[batching {stamp}] {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- processes


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait, then SIGKILL; then every descendant still alive
    (``mlx-stack up`` starts each role in a session of its own)."""
    # A second Ctrl-C or SIGTERM must not cut this short.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        family = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(family, timeout=5)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[
        subprocess.Popen[bytes]]:
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_ready(server: Server, timeout: float = READY_TIMEOUT) -> None:
    """GET /health answers 200 and a tiny completion succeeds (a model may still be
    loading after /health)."""
    deadline = time.monotonic() + timeout
    try:
        wait_healthy(server.url, server.proc, timeout)
    except SystemExit as exc:
        raise RuntimeError(f"{server.name} not healthy ({exc}); its log:\n"
                           f"{tail(server.log)}") from None
    body = {"model": server.model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
            if response.status_code == 200 and response.json()["choices"][0]["message"]:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} never completed a request; its log:\n"
                       f"{tail(server.log)}")


def mapped_blas(pid: int) -> list[str] | None:
    """The BLAS libraries a process has mapped (None where that cannot be read)."""
    try:
        paths = {m.path for m in psutil.Process(pid).memory_maps()}
    except (psutil.Error, NotImplementedError, OSError):
        return None
    return sorted(p for p in paths if "blas" in Path(p).name.lower())


def worker_pid(up: subprocess.Popen[bytes]) -> int | None:
    for child in descendants(up.pid):
        with contextlib.suppress(psutil.Error):
            if "worker" in child.cmdline()[3:4]:  # python -m mlx_stack.cli worker ...
                return child.pid
    return None


def resolve_library(name: str | None) -> str | None:
    """The file behind a library name this process loaded (find_library gives a soname)."""
    if name is None or "/" in name:
        return name
    stem = name.split(".so")[0]
    for path in mapped_blas(os.getpid()) or []:
        if Path(path).name.startswith(stem):
            return path
    return name


# ---------------------------------------------------------------- requests


async def stream_chat(client: httpx.AsyncClient, server: Server,
                      messages: list[dict[str, str]], max_tokens: int,
                      timeout: float) -> Reply:
    """One streamed chat completion: its text, time to first content, the server's usage;
    what arrived until a failure (a refusal, an error event, a broken stream)."""
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    stream = ChatStream()
    error: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await read_chat(client, server.url, body, into=stream)
        stream.check()
    except (httpx.HTTPError, RuntimeError, TimeoutError, ValueError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    return Reply(stream.sent, time.perf_counter(), stream.ttft, stream.text,
                 stream.usage.get("completion_tokens"), error)


def async_client(connections: int, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0),
                             limits=httpx.Limits(max_connections=connections + 2))


async def burst(server: Server, prompts: list[str], max_tokens: int,
                timeout: float) -> list[Reply]:
    async with async_client(len(prompts), timeout) as client:
        return list(await asyncio.gather(*(
            stream_chat(client, server, [{"role": "user", "content": p}], max_tokens, timeout)
            for p in prompts)))


async def conversation(client: httpx.AsyncClient, server: Server, agent: int, system: str,
                       turns: int, max_tokens: int, timeout: float) -> list[Reply]:
    """One agent: each turn sends the whole history and appends the streamed reply."""
    messages = [{"role": "system", "content": system}]
    replies: list[Reply] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": TURNS[(agent + turn) % len(TURNS)]})
        reply = await stream_chat(client, server, messages, max_tokens, timeout)
        replies.append(reply)
        if reply.error:
            break
        messages.append({"role": "assistant", "content": reply.text})
    return replies


async def agents_at_once(server: Server, systems: list[str], turns: int, max_tokens: int,
                         timeout: float) -> list[list[Reply]]:
    async with async_client(len(systems), timeout) as client:
        return list(await asyncio.gather(*(
            conversation(client, server, agent, system, turns, max_tokens, timeout)
            for agent, system in enumerate(systems))))


# ---------------------------------------------------------------- prompts


def story_prompt(index: int) -> str:
    """Distinct prompts for the first len(TOPICS) * len(FORMS) indices."""
    topic = TOPICS[index % len(TOPICS)]
    form = FORMS[(index // len(TOPICS)) % len(FORMS)]
    return f"Write a {form} about {topic}."


def handbook(agent: int, target_tokens: int, count: Callable[[str], int]) -> str:
    """A made-up project handbook of about ``target_tokens`` tokens, distinct per agent."""
    rng = random.Random(1000 + agent)
    area = AREAS[agent % len(AREAS)]
    lines = [f"You are agent-{agent}, a coding agent on the {area} project.",
             f"Project handbook for agent-{agent}. Follow every numbered rule below; quote "
             "the rule's number when a reply depends on it. Keep answers short.", ""]
    rule = 0
    while count("\n".join(lines)) < target_tokens:
        rule += 1
        text = rng.choice(RULES).format(
            a=agent, area=rng.choice(AREAS), thing=rng.choice(THINGS), tag=rng.choice(TAGS),
            n=rng.randint(2, 9), day=rng.randint(1, 28), hour=rng.randint(9, 17),
            ms=rng.choice((50, 100, 200, 500)))
        lines.append(f"Rule {rule}. {text}")
    return "\n".join(lines)


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
