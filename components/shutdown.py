"""A failed `pulumi up` must end with the failed step's own message, not a Python traceback.

When a step fails, the engine stops the resource monitor without waiting for the program
(pulumi/pulumi v3.274.1 `pkg/resource/deploy/deployment_executor.go`, `Execute`: on error
`src.Cancel` runs with an already-cancelled context, in a goroutine) and closes the deployment. The
Python language host then ends the program's process with SIGINT (`sdk/python/cmd/
pulumi-language-python/main.go`, `cmd.Cancel = ... Signal(os.Interrupt)`), while registrations the
program still awaits are failing with `UNAVAILABLE: resource monitor shut down`. The exec shim
(`pulumi-language-python-exec`) catches `Exception` only, so the `KeyboardInterrupt`, chained to
those gRPC errors, printed 10-150 lines of traceback after the real error. Ctrl-C in `pulumi up`
reaches the program the same way (the terminal signals the whole process group) and the CLI then
cancels gracefully on its own, so a quiet exit loses nothing there either.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

# The language host's `pythonProcessExitedAfterShowingUserActionableMessage`: on this exit code it
# adds no "program exited with non-zero exit code" line of its own (the engine already said why).
EXIT_MESSAGE_SHOWN = 32


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_MESSAGE_SHOWN)  # no interpreter shutdown: nothing left to print a traceback


def exit_quietly_on_interrupt() -> None:
    """Replace Python's KeyboardInterrupt with a quiet exit; the engine reports what failed."""
    signal.signal(signal.SIGINT, _exit_quietly)
