"""`microct-sr simulate` (not implemented yet)."""

import click


@click.command("simulate")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'simulate' is not implemented yet")
