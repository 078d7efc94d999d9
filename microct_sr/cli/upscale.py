"""`microct-sr upscale` (not implemented yet)."""

import click


@click.command("upscale")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'upscale' is not implemented yet")
