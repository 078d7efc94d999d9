"""The ``microct-sr`` command: a click group with one thin module per subcommand.

Exit status: 0 success, 2 bad input (:class:`~microct_sr.errors.UserError` or a usage error),
1 anything else, 130 on Ctrl-C, 143 on SIGTERM (129 on SIGHUP): a stopped run cleans up its
temporary output either way. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click

from .. import __version__
from ..atomic import exit_on_termination
from ..errors import UserError
from . import _common

# Explicit list, no import-time scanning: (module under microct_sr.cli, command name).
SUBCOMMANDS = ["info", "upscale", "simulate", "phantom", "pair", "evaluate", "train"]


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so ``--help`` stays fast and
    ``upscale`` never imports the heavy optional stack of ``evaluate``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module = importlib.import_module(f"{__name__}.{name}")
        return module.command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="microct-sr")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """8x super-resolution of bone micro-CT (R2-RCANGAN)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    # torchrun's other processes log warnings and errors only: their INFO lines repeat rank 0's
    quiet_rank = os.environ.get("RANK", "0") != "0" and not debug
    logging.basicConfig(level=logging.DEBUG if debug else
                        logging.WARNING if quiet_rank else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the group and map errors to exit codes."""
    # OpenMP threads that spin while waiting made torch 5x slower when anything else ran on
    # the CPU (two scans upscaled side by side: 1.3 vs 7.4 slices/s each); passive waiting
    # costs ~30% on an idle machine, where OMP_WAIT_POLICY=ACTIVE wins it back
    # (docs/performance.md). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    # SIGTERM (job schedulers, kill) and SIGHUP stop a run as Ctrl-C does, so every command
    # removes its temporary output (pair's patch folder, a half-written report) on the way out
    with exit_on_termination():
        _run(args, debug)


def _run(args: list[str], debug: bool) -> None:
    """Run the group on ``args`` and exit with the status the conventions give."""
    # under torchrun only rank 0 prints the JSON document, as for a run that works
    fail = _Failure("--json" in args and os.environ.get("RANK", "0") == "0")
    try:
        cli.main(args=args, prog_name="microct-sr", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        fail(2 if isinstance(e, click.UsageError) else e.exit_code, e.format_message())
    except click.exceptions.Abort:
        fail(130, "Aborted.", stderr="Aborted.")
    except UserError as e:
        if debug:  # the traceback, but the same exit status: scripts branch on it
            traceback.print_exc()
        fail(2, str(e), path=e.path, stderr=f"error: {e}")
    except KeyboardInterrupt:
        fail(130, "Interrupted.", stderr="Interrupted.")
    except SystemExit as e:  # SIGTERM/SIGHUP (atomic.raise_exit) or a command's own exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code and isinstance(e.code, int):
            fail(code, f"stopped by signal {code - 128}" if code > 128 else str(code))
        elif code:  # sys.exit("message"): Python would print the message itself
            fail(code, str(e.code), stderr=str(e.code))
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence for a CLI
        if debug:
            raise
        fail(1, f"{type(e).__name__}: {e}",
             stderr=f"error: {type(e).__name__}: {e} (run with --debug for the traceback)")
    sys.exit(0)


class _Failure:
    """Ends a failed run: a line on stderr and, when ``--json`` was asked for and the command
    printed no JSON yet, ``{"error", "exit_code", "path"}`` on stdout, so that a script that
    parses stdout gets one document whether the run worked or not."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.printed = _common.json_documents()

    def __call__(self, code: int, message: str, *, path: str | None = None,
                 stderr: str | None = None) -> None:
        if stderr is not None:
            click.echo(stderr, err=True)
        if self.as_json and _common.json_documents() == self.printed:
            _common.emit_json({"error": message, "exit_code": code, "path": path})
        sys.exit(code)
