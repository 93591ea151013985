"""Protocol version numbers: ``major<<24 | minor<<16 | patch<<8 | stage``."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass


class Stage(enum.IntEnum):
    """Release stage in the low byte of a version; only LIVE is a final release."""

    LIVE = 1
    RC = 2
    BETA = 4
    ALPHA = 8
    DEV = 16


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    stage: int = Stage.LIVE

    @classmethod
    def from_uint32(cls, value: int) -> Version:
        return cls((value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)

    def to_uint32(self) -> int:
        return (self.major << 24) | (self.minor << 16) | (self.patch << 8) | self.stage

    def __lt__(self, other: object) -> bool:
        # The number decides first; on a tie any pre-release stage is older than live.
        if not isinstance(other, Version):
            return NotImplemented
        mine, theirs = self.to_uint32() >> 8, other.to_uint32() >> 8
        if mine != theirs:
            return mine < theirs
        return self.stage != Stage.LIVE and other.stage == Stage.LIVE

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return not self < other and not other < self

    def __hash__(self) -> int:
        return hash((self.major, self.minor, self.patch, self.stage == Stage.LIVE))

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        try:
            stage = Stage(self.stage)
        except ValueError:
            return f"{text}-stage{self.stage}"
        return text if stage is Stage.LIVE else f"{text}-{stage.name.lower()}"


#: What we speak and the oldest client we accept: 1.1.0-alpha, as the reference.
CURRENT_VERSION = Version(1, 1, 0, Stage.ALPHA)
MIN_SUPPORTED_VERSION = Version(1, 1, 0, Stage.ALPHA)
