"""Test modules that follow one history (a stack's releases, a server's TLS life), run alone and in any order.

    story = Story()
    story_outcomes = story.fixture()      # module-scoped: one history per module run

    @story.stage
    def test_01_v1_goes_live(stack: Stack) -> None: ...

Each `@story.stage` function is a stage, in file order. When pytest runs a stage's test, the stages
before it that have not run yet run first, in order, with the fixtures they name (resolved through
the test's own `request`, so module fixtures are created when the first stage needing them runs),
and each outcome is kept; the stage itself runs once. So `pytest path::test_05_...` alone builds
stages 1-4 first, and a random order changes nothing about what each stage sees. A test whose
stage passed fails anyway when a stage it builds on failed, naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

Outcomes = dict[str, BaseException | None]


class Story:
    def __init__(self) -> None:
        self.stages: list[Callable[..., None]] = []

    def fixture(self) -> Any:
        """The module-scoped fixture `story_outcomes` holding each stage's outcome for this module run."""

        @pytest.fixture(scope="module", name="story_outcomes")
        def story_outcomes() -> Outcomes:
            return {}

        return story_outcomes

    def stage(self, fn: Callable[..., None]) -> Callable[[pytest.FixtureRequest], None]:
        self.stages.append(fn)

        def test(request: pytest.FixtureRequest) -> None:
            self.run_to(fn.__name__, request)

        test.__name__, test.__qualname__, test.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        return test

    def run_to(self, name: str, request: pytest.FixtureRequest) -> None:
        outcomes: Outcomes = request.getfixturevalue("story_outcomes")
        before: list[str] = []
        for fn in self.stages:
            if fn.__name__ not in outcomes:
                kwargs = {p: request.getfixturevalue(p) for p in inspect.signature(fn).parameters}
                try:
                    fn(**kwargs)
                    outcomes[fn.__name__] = None
                except Exception as err:
                    outcomes[fn.__name__] = err
            if fn.__name__ == name:
                break
            before.append(fn.__name__)
        own = outcomes[name]
        if own is not None:
            raise own
        failed = [n for n in before if outcomes[n] is not None]
        if failed:
            pytest.fail(f"{name} passed, but stages it builds on failed: {', '.join(failed)}")
