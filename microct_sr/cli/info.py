"""`microct-sr info` (not implemented yet)."""

import click


@click.command("info")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'info' is not implemented yet")
