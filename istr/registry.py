"""Looking up an ablation arm by name: the one error every arm registry raises (docs/adding-an-arm.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class UnknownArmError(ValueError):
    """A config names an arm its registry does not hold; the message lists the valid names."""


def pick(registry: Mapping[str, T], name: str, key: str) -> T:
    """``registry[name]``, or UnknownArmError naming the config ``key`` and the valid arms."""
    try:
        return registry[name]
    except KeyError:
        raise UnknownArmError(f"{key}={name!r} is not a known arm; valid: {', '.join(registry)}") from None
