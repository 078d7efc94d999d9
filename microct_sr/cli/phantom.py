"""`microct-sr phantom` (not implemented yet)."""

import click


@click.command("phantom")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'phantom' is not implemented yet")
