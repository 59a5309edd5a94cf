"""Python dynamic resources under the SDK's mock monitor: run the resource's own provider.

The engine hands a dynamic resource to the Python dynamic-provider host, which unpickles the
`__provider` input (dill, base64) and calls its `create`; the mock monitor would otherwise just
echo the inputs back, leaving every output the provider computes unset. This does what the host
does for a create (pulumi/dynamic/__main__.py), so the program under test sees real outputs.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import dill  # type: ignore[import-untyped]
from pulumi.dynamic import ResourceProvider
from pulumi.runtime import mocks as pulumi_mocks

DYNAMIC_PREFIX = "pulumi-python:dynamic"
PROVIDER_KEY = "__provider"


def is_dynamic(typ: str) -> bool:
    return typ == f"{DYNAMIC_PREFIX}:Resource" or typ.startswith(f"{DYNAMIC_PREFIX}/")


def load_provider(inputs: Mapping[str, Any]) -> ResourceProvider:
    """The resource's provider, unpickled from its `__provider` input as the dynamic-provider host does."""
    serialized = inputs[PROVIDER_KEY]
    # the SDK marks the serialized provider secret; the mock hands it over still wrapped
    text = serialized["value"] if isinstance(serialized, dict) else serialized
    provider = dill.loads(base64.b64decode(text))  # noqa: S301 (the program's own provider, as the engine's host loads it)
    assert isinstance(provider, ResourceProvider), type(provider)
    return provider


def props(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k != PROVIDER_KEY}


def create(args: pulumi_mocks.MockResourceArgs) -> tuple[str, dict[str, Any]]:
    """(id, outputs) of the provider's `create`, with `__provider` kept as the host keeps it."""
    result = load_provider(args.inputs).create(props(args.inputs))
    return result.id, {**props(args.inputs), **(result.outs or {}), PROVIDER_KEY: args.inputs[PROVIDER_KEY]}
