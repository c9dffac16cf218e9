"""Errors that carry their exit code, so every entry point maps failures the same way.

DESIGN section 6: 0 ok; 2 usage or config error; 3 data-quality gate failed; 4 model
gate not passed; 5 required input missing; 1 anything else.
"""

from __future__ import annotations


class StreamrankError(Exception):
    """Base error; `exit_code` is what the CLI returns for it.

    `outcome` names the few errors that are an expected state of a night rather than a
    failure (`streamrank nightly` goes on past them). An exit code alone cannot say so:
    score exits 5 both when no champion exists yet (nothing to do) and when tomorrow's
    schedule never landed (someone must act). The CLI prints the outcome on a line of its
    own so a scheduler can tell the two apart (deploy/airflow).
    """

    exit_code = 1
    outcome: str | None = None


class UsageError(StreamrankError):
    """Bad arguments or configuration: the operator must fix the command line or conf."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is unknown, mistyped or malformed."""


class LockHeldError(UsageError):
    """Another nightly holds the warehouse lock."""


class QualityGateError(StreamrankError):
    """A critical expectation failed; nothing was published."""

    exit_code = 3

    def __init__(self, message: str, data_docs: str | None = None) -> None:
        super().__init__(message + (f"\n  data docs: {data_docs}" if data_docs else ""))
        self.data_docs = data_docs


class ModelGateError(StreamrankError):
    """The challenger did not pass the promotion gate; the champion is unchanged."""

    exit_code = 4
    outcome = "gate_not_passed"


class MissingInputError(StreamrankError):
    """A required input (landing folder, table partition, model alias) is not there."""

    exit_code = 5


class ConcurrentWriteError(StreamrankError):
    """Another writer changed the files a replace or merge read; nothing was committed: re-run."""


class SchemaMismatchError(StreamrankError):
    """A frame written to a table does not match the table's schema."""


class InsufficientHistoryError(MissingInputError):
    """Too little history to train (a new warehouse's first nights); the nightly goes on."""

    outcome = "insufficient_history"


class OlderNightError(MissingInputError):
    """`train --newest-only` for a night older than the challenger's: that night's model is not wanted.

    A scheduler that runs the stages one by one (deploy/airflow) passes --newest-only so a
    backfill skips train, evaluate and promote, as `streamrank nightly` does.
    """

    outcome = "older_than_challenger"


class NoChampionError(MissingInputError):
    """No model holds the `champion` alias yet, so there is nothing to score with."""

    outcome = "no_champion"
