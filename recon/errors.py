"""Typed errors. Every expected failure is one of these: a message naming the bad
value, a hint saying what to do, and the exit code the CLI returns (DESIGN §9)."""
from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_MISSING = 4
EXIT_STAGE_FAILED = 5
EXIT_INTERRUPTED = 130


class ReconError(Exception):
    """Base class of expected errors. `str(err)` is the one-line message."""

    exit_code = EXIT_BUG
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        return {
            "error": self.kind,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }

    def one_line(self) -> str:
        return f"{self.message}" + (f" (hint: {self.hint})" if self.hint else "")


class UsageError(ReconError):
    """Bad option, bad config key, inconsistent flags."""

    exit_code = EXIT_USAGE
    kind = "usage"


class InputError(ReconError):
    """The input (image, views folder, checkpoint contents) is unusable."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad_input"


class NoFaceError(InputError):
    kind = "no_face"


class MissingError(ReconError):
    """Weights, a back-end (nerfstudio, ffmpeg, CUDA) or an optional extra is missing."""

    exit_code = EXIT_MISSING
    kind = "missing"


class WeightsError(MissingError):
    """Weights absent, truncated, of the wrong model, or unsafe to load."""

    kind = "weights"


class StageError(ReconError):
    """A stage ran and failed (fit diverged, mesh extraction found no surface...)."""

    exit_code = EXIT_STAGE_FAILED
    kind = "stage_failed"

    def __init__(self, message: str, hint: str | None = None, stage: str | None = None):
        super().__init__(message, hint)
        self.stage = stage

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["stage"] = self.stage
        return d


class OutputError(UsageError):
    """The output location cannot be written (permissions, a file where a folder goes)."""

    kind = "output"
