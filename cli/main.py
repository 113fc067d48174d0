"""The ``mlx-stack`` command line: start this node's roles, alone or all together.

Every option also reads an environment variable ``MLX_STACK_<NAME>`` and the file
``$MLX_STACK_HOME/config.toml``; a flag wins over both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mlx_stack.cli import node
from mlx_stack.cli.console import err, settings
from mlx_stack.cli.mesh import mesh

app = typer.Typer(
    name="mlx-stack",
    help="Pool Macs running mlx-lm into one OpenAI-compatible endpoint.\n\n"
    "Start here: `mlx-stack up` serves the default model at http://localhost:4000/v1.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(mesh)

Home = Annotated[Path | None, typer.Option(help="Config, secrets and models [~/.mlx-stack].",
                                            show_default=False)]
NodeId = Annotated[str | None, typer.Option(help="This node's name in the mesh \\[hostname].",
                                            show_default=False)]
LogLevel = Annotated[str | None, typer.Option(help="debug, info, warning or error \\[warning].",
                                              show_default=False)]
Broker = Annotated[str | None, typer.Option(
    "--broker", help="Broker endpoint to connect to [tcp://127.0.0.1:4100].",
    show_default=False)]
MODEL_HELP = (
    "Model to serve, SPEC[=TIER[,TIER...]]: SPEC is a local mlx-lm directory, a name under "
    "the models directory, a cached Hugging Face id or `default`; each TIER (fast, "
    "standard, premium...) is another name it answers to. Repeat for several models (one "
    "worker each). \\[config.toml's \\[models] serve, else the default model] The default "
    "model answers to fast and standard only when the node serves nothing else, unless "
    "given its tiers: default=fast.")
Models = Annotated[list[str] | None, typer.Option("--model", help=MODEL_HELP,
                                                  show_default=False)]


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="Gateway HTTP port [4000].",
                                             show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="Gateway bind address [127.0.0.1].",
                                             show_default=False)] = None,
    model: Models = None,
    broker_port: Annotated[int | None, typer.Option(help="Broker port [4100].",
                                                    show_default=False)] = None,
    home: Home = None, node_id: NodeId = None, log_level: LogLevel = None,
) -> None:
    """Run this node in the foreground: broker, gateway and one worker per model.

    A child that dies is restarted; Ctrl-C or SIGTERM stops everything.
    """
    from mlx_stack.cli.node import UP_PID
    from mlx_stack.cli.services import expected_names, model_specs, resolve_workers
    from mlx_stack.cli.supervisor import Child, Supervisor, child_env, role_argv

    cfg = settings(home=home, node_id=node_id, log_level=log_level, gateway_port=port,
                   gateway_host=host, broker_port=broker_port)
    try:  # pull/convert here, once, with progress on this terminal
        served = resolve_workers(model_specs(model, cfg), cfg.models_path)
    except (ValueError, RuntimeError) as exc:
        err.print(f"[red]cannot serve:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    children = [Child("broker", role_argv("broker"))]
    children += [Child(f"worker {w.model_id}", role_argv("worker", *w.argv)) for w in served]
    children.append(Child("gateway", role_argv("gateway")))
    env = child_env({"home": cfg.home, "node_id": cfg.node_id, "log_level": cfg.log_level,
                     "gateway_port": cfg.gateway_port, "gateway_host": cfg.gateway_host,
                     "broker_port": cfg.broker_port,
                     "expect_models": expected_names(served)})
    shown = "localhost" if cfg.gateway_host in ("127.0.0.1", "0.0.0.0") else cfg.gateway_host
    base = f"http://{shown}:{cfg.gateway_port}/v1"
    names = "\n".join(f"  {w.model_id}" + (f" (tiers: {', '.join(w.tiers)})" if w.tiers
                                             else "") for w in served)
    banner = (f"[green]mlx-stack is serving[/green] on node {cfg.node_id}:\n{names}\n"
              f"  export OPENAI_API_BASE={base}\nCtrl-C stops everything.")
    health = f"http://127.0.0.1:{cfg.gateway_port}/health"
    pid_file = cfg.home / UP_PID  # for `mlx-stack down` and `status`
    cfg.home.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    try:
        code = Supervisor(children, env, err).run(health, [w.model_id for w in served], banner)
    finally:
        pid_file.unlink(missing_ok=True)
    sys.exit(code)


@app.command()
def broker(
    host: Annotated[str | None, typer.Option(help="Bind address [127.0.0.1].",
                                             show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="ROUTER port [4100].",
                                             show_default=False)] = None,
    home: Home = None, node_id: NodeId = None, log_level: LogLevel = None,
) -> None:
    """Run the broker: routes jobs from gateways to workers."""
    from mlx_stack.broker.main import main

    try:
        main(settings(broker_host=host, broker_port=port, home=home, node_id=node_id,
                      log_level=log_level))
    except ValueError as exc:  # no secret beyond loopback, address in use, ...
        err.print(f"[red]broker not started:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(
        help="Model to serve, SPEC[=TIER[,TIER...]] as for `up` (one model); with --engine "
        "synthetic, SPEC is the name to serve under. \\[the default model, as fast and "
        "standard]", show_default=False)] = None,
    engine: Annotated[str, typer.Option(
        help="mlx (real inference) or synthetic (fake tokens for routing/load tests).")
    ] = "mlx",
    max_slots: Annotated[int | None, typer.Option(
        help="mlx engine: most requests decoded at once; fewer when memory is short "
        "\\[setting max_slots, 8].", show_default=False)] = None,
    slots: Annotated[int, typer.Option(help="Synthetic engine: jobs at once.")] = 4,
    rate: Annotated[float, typer.Option(help="Synthetic engine: tokens/s per job.")] = 200.0,
    ttft: Annotated[float, typer.Option(help="Synthetic engine: seconds to first token.")
                    ] = 0.0,
    mem_total_gb: Annotated[float, typer.Option(
        help="Synthetic engine: report this much memory instead of the machine's.")] = 0.0,
    mem_free_gb: Annotated[float, typer.Option(
        help="Synthetic engine: report this much free memory (with --mem-total-gb).")] = 0.0,
    tool_parser: Annotated[str, typer.Option(
        help="Synthetic engine: the mlx-lm tool parser (json_tools, mistral...) whose "
        "tool calls a [[say]] script may write.", show_default=False)] = "",
    context_length: Annotated[int, typer.Option(
        help="Synthetic engine: prompt bytes and answer tokens one job may hold.")] = 262_144,
    prefill_rate: Annotated[float, typer.Option(
        help="Synthetic engine: prompt bytes per second it computes, one prompt at a time, "
        "of what its prompt cache does not hold (the first token waits for them); "
        "0 = at once.")] = 0.0,
    prompt_cache: Annotated[int, typer.Option(
        help="Synthetic engine: ended sequences its prompt cache keeps (0 = none).")] = 64,
    broker_endpoint: Broker = None, home: Home = None, node_id: NodeId = None,
    log_level: LogLevel = None,
) -> None:
    """Run one worker: load a model and serve it to the broker."""
    from mlx_stack.common.names import ModelSpec
    from mlx_stack.worker.main import SyntheticOptions, main

    if engine not in ("mlx", "synthetic"):
        err.print(f"[red]unknown engine {engine!r}[/red]: use mlx or synthetic")
        raise typer.Exit(2)
    cfg = settings(broker_endpoint=broker_endpoint, home=home, node_id=node_id,
                   log_level=log_level, max_slots=max_slots)
    gib = 1024**3
    options = SyntheticOptions(slots, rate, ttft, int(mem_total_gb * gib),
                               int(mem_free_gb * gib), tool_parser, context_length,
                               prefill_rate, prompt_cache) if engine == "synthetic" else None
    try:
        main(cfg, ModelSpec.parse(model or "default"), options)
    except ValueError as exc:
        err.print(f"[red]cannot serve {model or 'the default model'}:[/red] {exc}")
        raise typer.Exit(1) from None


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Bind address [127.0.0.1].",
                                             show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [4000].",
                                             show_default=False)] = None,
    max_body_bytes: Annotated[int | None, typer.Option(
        help="Larger request bodies get 413 [4194304].", show_default=False)] = None,
    max_messages: Annotated[int | None, typer.Option(
        help="Chat requests with more messages get 400 [1024].", show_default=False)] = None,
    max_tokens_limit: Annotated[int | None, typer.Option(
        help="Requests for more tokens get 400 [32768].", show_default=False)] = None,
    max_streams_per_client: Annotated[int | None, typer.Option(
        help="Streams one client address may hold open; more get 429 [256].",
        show_default=False)] = None,
    broker_endpoint: Broker = None, home: Home = None, node_id: NodeId = None,
    log_level: LogLevel = None,
) -> None:
    """Run the gateway: the OpenAI-compatible HTTP endpoint."""
    from mlx_stack.gateway.main import main

    main(settings(gateway_host=host, gateway_port=port, broker_endpoint=broker_endpoint,
                  home=home, node_id=node_id, log_level=log_level,
                  max_body_bytes=max_body_bytes, max_messages=max_messages,
                  max_tokens_limit=max_tokens_limit,
                  max_streams_per_client=max_streams_per_client))


@app.command()
def pull(home: Home = None) -> None:
    """Fetch and convert the default model now (otherwise done on first `up`)."""
    from mlx_stack.worker.default_model import ensure_default_model

    path = ensure_default_model(settings(home=home).models_path, err)
    err.print(f"default model ready in {path}")


for command in (node.install, node.uninstall, node.status, node.logs, node.down):
    app.command()(command)
