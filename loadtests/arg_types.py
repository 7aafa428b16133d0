"""argparse `type=` helpers shared by the benchmarks' command lines."""

from __future__ import annotations

from argparse import ArgumentTypeError


def key_value_arg(item: str) -> tuple[str, str]:
    """`--set KEY=VALUE` -> (KEY, VALUE), the value still a string (callers parse it as
    YAML). `rayfleet --help` builds every parser, so the config module, which pulls in
    torch, loads only when an argument is actually parsed."""
    from rayfleet.cluster.config import key_value

    try:
        return key_value(item)
    except ValueError as e:
        raise ArgumentTypeError(str(e)) from None
