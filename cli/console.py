"""Where the command line writes: results to stdout (for pipes), messages to stderr."""

from rich.console import Console

out = Console()
err = Console(stderr=True, soft_wrap=True)  # long hints stay whole for grep and logs
