"""`microct-sr evaluate` (not implemented yet)."""

import click


@click.command("evaluate")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("'evaluate' is not implemented yet")
