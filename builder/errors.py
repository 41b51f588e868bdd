"""The builder's exception tree: every message is a full sentence naming where it went wrong."""

from __future__ import annotations

import errno

__all__ = [
    "BuilderError",
    "ContextError",
    "DockerfileError",
    "ExpansionError",
    "LayerError",
    "OutputError",
    "RegistryError",
    "SandboxError",
    "StepFailed",
    "StoreError",
]


class BuilderError(Exception):
    """Base of every error the builder reports to a user."""


class DockerfileError(BuilderError):
    """The Dockerfile is invalid; the message names the file and line."""

    def __init__(self, message: str, *, filename: str = "Dockerfile", line: int = 0) -> None:
        self.filename = filename
        self.line = line
        self.reason = message
        where = f"{filename}:{line}" if line else filename
        super().__init__(f"{where}: {message}")


class ContextError(BuilderError):
    """A build-context path is missing, unreadable or points outside the context."""


class LayerError(BuilderError):
    """A layer cannot be diffed or applied (hostile or corrupt tar, unsupported upper dir)."""


class StoreError(BuilderError):
    """The store is corrupt, missing a blob or an image, or cannot be written."""


class SandboxError(BuilderError):
    """The sandbox for a RUN step could not be set up."""


class StepFailed(BuilderError):
    """A RUN step exited non-zero."""


class OutputError(BuilderError):
    """The command's output could not be written: ``quiet`` when its reader went away (a pipe
    that ``head`` closed), which is no news to anyone."""

    def __init__(self, exc: OSError) -> None:
        self.quiet = exc.errno == errno.EPIPE
        super().__init__(f"cannot write the output: {exc.strerror or exc}.")


class RegistryError(BuilderError):
    """A registry refused a request or returned something that does not verify."""


class ExpansionError(BuilderError):
    """A word cannot be expanded (bad substitution, unterminated quote); callers add the line."""
