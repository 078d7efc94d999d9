"""`microct-sr pair` (not implemented yet)."""

import click


@click.command("pair")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'pair' is not implemented yet")
