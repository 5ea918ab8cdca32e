"""`python -m evaluation ...`: the evaluation commands without the service installed around them."""

import typer

from evaluation.cli import register

app = typer.Typer(no_args_is_help=True)
register(app)
app()
