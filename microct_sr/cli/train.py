"""`microct-sr train` (not implemented yet)."""

import click


@click.command("train")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'train' is not implemented yet")
