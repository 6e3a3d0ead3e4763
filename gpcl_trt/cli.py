"""The ``gpcl-trt`` command line: a thin shell over the Python API.

Every command calls one function of ``gpcl_trt.<area>`` that returns a result dict; the CLI
only parses options, prints the human summary on stderr and, with ``--json``, the same dict as
one JSON object on stdout. Exit codes: 0 ok, 1 check failed (``result["ok"] is False`` or
``CheckFailed``), 2 bad input (``GpclError``, a click usage error, a filesystem error such as a
read-only or full disk), 130 Ctrl-C, 143 SIGTERM (both unwind, so no temporary stays behind).
"""

from __future__ import annotations

import functools
import signal
import sys
from typing import Any, Callable

import click

from gpcl_trt import __version__
from gpcl_trt.common import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, GpclError, Terminated, os_error_line, to_json


def result_command(group: click.Group, name: str, **kwargs: Any) -> Callable:
    """Register ``fn`` as a command that returns a result dict (or raises GpclError)."""

    def deco(fn: Callable[..., dict]) -> click.Command:
        @functools.wraps(fn)
        def wrapper(*args: Any, as_json: bool = False, **kw: Any) -> None:
            def fail(message: str, code: int) -> None:
                click.echo(f"gpcl-trt {name}: error: {message}", err=True)
                if as_json:
                    click.echo(to_json({"ok": False, "error": message, "exit_code": code}))
                sys.exit(code)

            previous = signal.signal(signal.SIGTERM, _raise_terminated)
            try:
                result = fn(*args, **kw)
            except GpclError as exc:
                fail(str(exc), exc.exit_code)
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: temporaries were removed on the way out
                terminated = isinstance(exc, Terminated)
                fail(
                    f"{'terminated' if terminated else 'interrupted'}; nothing was written", 143 if terminated else 130
                )
            except OSError as exc:  # read-only or full disk, permissions, a file vanishing under us
                fail(os_error_line(exc), EXIT_BAD_INPUT)
            except MemoryError:
                fail("out of memory (try a smaller --memory-budget, batch or model)", EXIT_BAD_INPUT)
            finally:
                signal.signal(signal.SIGTERM, previous)
            result = result if result is not None else {}
            result.setdefault("ok", True)
            if as_json:
                click.echo(to_json(result))
            if not result["ok"]:
                sys.exit(EXIT_CHECK_FAILED)

        wrapper = click.option(
            "--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout."
        )(wrapper)
        return group.command(name, **kwargs)(wrapper)

    return deco


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


class _Main(click.Group):
    """Usage errors (bad option values, missing files) follow the same contract as every other
    bad input: one line on stderr, with --json the error object on stdout, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        # Group.invoke consumes these; keep them to see whether --json was asked for.
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            sub = exc.ctx is not None and exc.ctx is not ctx
            prog = f"gpcl-trt {exc.ctx.info_name}" if sub else "gpcl-trt"
            message = " ".join(exc.format_message().split())
            click.echo(f"{prog}: error: {message} (see '{prog} --help')", err=True)
            if "--json" in args:
                click.echo(to_json({"ok": False, "error": message, "exit_code": exc.exit_code}))
            sys.exit(exc.exit_code)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpcl-trt")
def main() -> None:
    """Export Hugging Face transformers to ONNX, insert the GPCL op, build TensorRT engines,
    check accuracy and serve the result with Triton.

    \b
    Typical flow (or all at once: gpcl-trt pipeline):
      gpcl-trt export MODEL_DIR -o m.onnx
      gpcl-trt calibrate m.onnx -o calib.json
      gpcl-trt insert m.onnx -o g.onnx --sites pre-attention,pre-mlp --calibration calib.json
      gpcl-trt build g.onnx -o g.engine
      gpcl-trt diff --reference MODEL_DIR --candidate g.onnx
      gpcl-trt triton g.onnx --repo repo --name gpcl_model
    """


def _register() -> None:
    # Each area owns its commands; importing these modules must stay cheap (no torch/onnx at
    # import time) so that `gpcl-trt --help` is instant.
    from gpcl_trt.accuracy import cli as accuracy_cli
    from gpcl_trt.deploy import cli as deploy_cli
    from gpcl_trt.engines import cli as engines_cli
    from gpcl_trt.exporter import cli as exporter_cli
    from gpcl_trt.generate import cli as generate_cli
    from gpcl_trt.passes import cli as passes_cli
    from gpcl_trt.passes import optimize_cli
    from gpcl_trt.quantize import cli as quantize_cli

    areas = (exporter_cli, passes_cli, optimize_cli, engines_cli, accuracy_cli, deploy_cli, generate_cli, quantize_cli)
    for area in areas:
        area.register(main)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
