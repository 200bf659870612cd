"""The ``ftkit`` command line: one module per command group, errors turned into one line here."""

from __future__ import annotations

import os
import sys

import click

from ftkit import __version__, distributed
from ftkit.cli.output import quiet_closed_stdout
from ftkit.errors import FtkitError

EPILOG = """\b
Examples:
  $ ftkit run recipes/quickstart.toml        # offline: SmolLM2-135M on the CPU, a few minutes
  $ ftkit estimate --model 1.5B --seq 256 --batch 4   # will it fit? memory part by part
  $ ftkit probe                              # this machine, and what fits on its GPU
  $ ftkit run recipes/emotion.toml --dry-run # resolved recipe + memory estimate
  $ ftkit tasks                              # which tasks are installed
  $ ftkit tasks show emotion                 # one task's labels, data layout, metrics
  $ ftkit plugins                            # installed plugins, and any that failed to load
  $ ftkit --debug tasks                      # full traceback when something fails

Plugins add tasks (and commands) through the `ftkit` entry-point group;
FTKIT_LOAD_PLUGINS=emotion,hc3 narrows which ones load (empty: none).
"""


class FtkitGroup(click.Group):
    """A group that reports :class:`FtkitError` as one line and adds commands from plugins."""

    _plugin_commands_added = False

    def _add_plugin_commands(self) -> None:
        if self._plugin_commands_added:
            return
        self._plugin_commands_added = True
        from ftkit.plugins import register_plugin_commands

        register_plugin_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def main(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - click's own signature
        try:
            return super().main(*args, **kwargs)
        except BaseException as done:
            if not distributed.started():
                raise
            # A rank of a multi-process run leaves through distributed.exit_process.
            if not isinstance(done, SystemExit):  # `--debug`: the traceback, as the interpreter prints it
                import traceback

                traceback.print_exc()
            code = done.code if isinstance(done, SystemExit) else 1
            distributed.exit_process(code if isinstance(code, int) else 0 if code is None else 1)

    def make_context(self, *args, **kwargs) -> click.Context:  # noqa: ANN002, ANN003 - click's own signature
        # `ftkit --help` prints while the context is made, before `invoke` (which handles a closed
        # pipe for every command): without this, click answers a closed pipe with status 1.
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            quiet_closed_stdout()
            raise click.exceptions.Exit(0) from None

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's own signature
        debug = ctx.params.get("debug") or os.environ.get("FTKIT_DEBUG") == "1"
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a reader gone away shows here, not in the interpreter's exit flush
            return result
        except BrokenPipeError:
            # `ftkit predict RUN FILE -o - | head -1`: the reader has what it wanted. Stop quietly
            # and successfully, as command-line tools do when their output pipe closes.
            quiet_closed_stdout()
            ctx.exit(0)
        except FtkitError as error:
            if debug:
                raise
            # Several processes (torchrun): rank 0 reports what failed on any rank (ftkit.distributed).
            if distributed.is_main():
                _print_error(str(error))
            ctx.exit(error.exit_code)
        except KeyboardInterrupt as error:
            if debug:
                raise
            if distributed.is_main():
                _print_error(str(error) or "interrupted")
            # Ctrl-C, or a signal a run stopped on (ftkit.interrupts.Stopped): 128 + its number.
            ctx.exit(getattr(error, "exit_code", 130))
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            _print_error(
                f"internal error: {type(error).__name__}: {error} "
                "(run again with `ftkit --debug ...` for the traceback, and please report it)"
            )
            ctx.exit(1)


def _close_progress_bars() -> None:
    """Close live tqdm bars (the Trainer's), so the error is the last line, not a bar redrawn after it."""
    if "tqdm" not in sys.modules:  # nothing to close, and no import on the fast path
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _print_error(message: str) -> None:
    _close_progress_bars()
    where = "" if distributed.is_main() else f"rank {distributed.rank()}: "
    click.secho(f"Error: {where}{message}", fg="red", err=True)


@click.group(cls=FtkitGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ftkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """ftkit: fine-tune small open LLMs (QLoRA/LoRA/full) and prove they beat the base model."""
    _log_to_stderr(debug)


def _log_to_stderr(debug: bool) -> None:
    """ftkit's own log lines (data rows dropped, fallbacks taken) as `Warning: ...` on stderr."""
    import logging

    log = logging.getLogger("ftkit")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    # Every rank of a multi-process run reads the same data: only rank 0 reports dropped rows.
    log.setLevel(logging.DEBUG if debug else logging.INFO if distributed.is_main() else logging.ERROR)


# Command modules are light: each imports torch & co. only inside the command that needs them.
from ftkit.cli.data import data  # noqa: E402
from ftkit.cli.estimate import estimate  # noqa: E402
from ftkit.cli.new_task import new_task  # noqa: E402
from ftkit.cli.plugins import plugins  # noqa: E402
from ftkit.cli.probe import probe  # noqa: E402
from ftkit.cli.run import run as run_command  # noqa: E402
from ftkit.cli.run import validate  # noqa: E402
from ftkit.cli.tasks import tasks  # noqa: E402
from ftkit.cli.use import chat, eval_command, merge, predict  # noqa: E402

main.add_command(tasks)
main.add_command(plugins)
main.add_command(run_command, "run")
main.add_command(validate)
main.add_command(data)
main.add_command(probe)
main.add_command(estimate)
main.add_command(predict)
main.add_command(eval_command, "eval")
main.add_command(chat)
main.add_command(merge)
main.add_command(new_task)

