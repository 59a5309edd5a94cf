"""TEST-ONLY stand-in for `pulumi up` against real hosts (see ENGINE.md). Never used by the program."""

from tests.engine.engine import (
    CommandError,
    Engine,
    EngineError,
    RunFailedError,
    RunReport,
    Step,
    UnsupportedError,
)

__all__ = ["CommandError", "Engine", "EngineError", "RunFailedError", "RunReport", "Step", "UnsupportedError"]
