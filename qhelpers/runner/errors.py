"""The runner's usage error and its exit codes (shared by the command line, the supervisor and the workers)."""
from __future__ import annotations

from qhelpers.util.errors import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: A worker's exit code when it could not write its notebook's run.json (its record is in .jobs/).
EXIT_RECORD_FAILED = 3
#: A worker started ahead (``--start-ahead``) that was stopped before its notebook started: no record.
EXIT_NOT_STARTED = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class RunnerError(ConfigError):
    """A usage or configuration error of the runner (exit code 2)."""
