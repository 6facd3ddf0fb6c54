"""The `splitllm` command line: one module per command, registered here."""

from __future__ import annotations

import typer

from .. import __version__
from . import bench, eval, generate, plan, profile, quantize, serve

app = typer.Typer(
    name="splitllm",
    help="Run an LLM split between an edge device and a cloud server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"splitllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Run an LLM split between an edge device and a cloud server."""


app.command("generate")(generate.generate_cmd)
app.command("quantize")(quantize.quantize_cmd)
app.command("profile")(profile.profile_cmd)
app.command("plan")(plan.plan_cmd)
app.command("eval")(eval.eval_cmd)
app.command("serve-cloud")(serve.serve_cloud_cmd)
app.command("serve-edge")(serve.serve_edge_cmd)
app.add_typer(bench.app, name="bench")


def main() -> None:
    app()
