"""What every command shares: where it writes (results to stdout for pipes, messages to
stderr) and how it loads its settings, failing early with a message and exit code 2."""

import typer
from rich.console import Console

from mlx_stack.common.config import Settings
from mlx_stack.common.meshkeys import MeshSecretError, load_keys

out = Console()
err = Console(stderr=True, soft_wrap=True)  # long hints stay whole for grep and logs


def settings(**overrides: object) -> Settings:
    """Settings from flags (None = not given), or exit with the configuration error.

    The mesh secret is checked here too, so that a role never starts half-configured."""
    try:
        cfg = Settings.load(**overrides)
        load_keys(cfg.home)
    except MeshSecretError as exc:
        err.print(f"[red]mesh secret:[/red] {exc}")
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None
    return cfg
