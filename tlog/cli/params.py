"""Option types the commands share, light to import (no storage or record code)."""

from __future__ import annotations

from typing import Any

import click

from tlog.units import parse_size


class SizeParam(click.ParamType):
    """A size in bytes as every command takes it (`tlog.units.parse_size`): 4096, 64M, 10GiB,
    500MB."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
