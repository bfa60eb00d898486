"""The `cnnc` click group: global options, the commands, and how every failure becomes one line and an exit code.

Exit codes: 0 ok; 1 equivalence failure; 2 bad input or usage; 3 internal error (a bug in cnnc). Every error is one
`error: ...` line on stderr with no traceback; `cnnc --debug ...` shows the traceback. The routing lives in
`_CnncGroup.main`, so it holds under click's CliRunner too, not only for the console script.

To add a command: write `cnnc/cli/<name>.py` with one `@click.command("<name>")` function that imports what it needs
at module top and raises `cnnc.errors.UsageError` / `ModelError` for the user's mistakes, then import it here and
add it with `cli.add_command` below (the order of the list is the order of `cnnc --help`).
"""

from __future__ import annotations

import sys
import traceback

import click

from cnnc.cli.analyze import analyze_command
from cnnc.cli.bench import bench_command
from cnnc.cli.compile import compile_command
from cnnc.cli.example import example_command
from cnnc.cli.explain import explain_command
from cnnc.cli.export import export_command
from cnnc.cli.inspect import inspect_command
from cnnc.cli.passes import passes_command
from cnnc.cli.verify import verify_command
from cnnc.errors import CnncError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _CnncGroup(click.Group):
    """Routes every failure to one `error:` line and the documented exit code, also under click's CliRunner."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(args) if args is not None else sys.argv[1:]
        debug = "--debug" in argv
        try:
            value = super().main(args=argv, prog_name=prog_name or "cnnc", complete_var=complete_var,
                                 standalone_mode=False, **extra)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.ClickException as error:
            _fail(error.format_message(), 2)
        except click.exceptions.Abort:
            _fail("aborted", 2)
        except CnncError as error:
            if debug:
                traceback.print_exc()
            _fail(str(error), error.exit_code)
        except Exception as error:  # noqa: BLE001 — the last resort: any other error is an internal error, exit 3
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(error).__name__}: {error} (run `cnnc --debug ...` for the traceback)", 3)
        sys.exit(value if isinstance(value, int) else 0)


@click.group(cls=_CnncGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks on errors")
@click.version_option(package_name="cnnc")
def cli(debug: bool) -> None:
    """cnnc: exact algebraic compilation of convolutional networks in ONNX."""


for _command in (compile_command, export_command, passes_command, inspect_command, verify_command, example_command,
                 bench_command, analyze_command, explain_command):
    cli.add_command(_command)


def main() -> None:
    cli.main()
