"""The example Airflow DAG agrees with the CLI it drives (no Airflow needed).

The DAG skips a task only on an (exit code, outcome) pair it knows, matched against the
outcome line the CLI prints. Neither side imports the other, so a renamed outcome, a new
expected state, a reworded line or a new stage would silently turn a skip into a failure
(or the reverse). The DAG file is read as source here, since Airflow is not installed.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from streamrank import cli, errors
from streamrank.nightly import STAGE_ORDER

DAG = Path(__file__).resolve().parents[2] / "deploy" / "airflow" / "streamrank_nightly.py"


def dag_constants() -> dict[str, object]:
    """The DAG module's top-level literal assignments, and OUTCOME's pattern text."""
    found: dict[str, object] = {}
    for node in ast.parse(DAG.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            if name == "OUTCOME" and isinstance(value, ast.Call):
                found[name] = ast.literal_eval(value.args[0])
            else:
                try:
                    found[name] = ast.literal_eval(value)
                except ValueError:
                    continue
    return found


def outcome_errors() -> list[type[errors.StreamrankError]]:
    return [c for c in vars(errors).values()
            if isinstance(c, type) and issubclass(c, errors.StreamrankError) and c.outcome]


def test_dag_runs_the_nightlys_stages_in_its_order():
    assert dag_constants()["STAGES"] == list(STAGE_ORDER)


def skip_pairs() -> list[tuple[str, int, str]]:
    """(stage, exit code, outcome) for every skip the DAG knows."""
    return [(stage, code, outcome) for stage, pairs in dag_constants()["SKIP_ON"].items() for code, outcome in pairs]


def test_every_expected_state_is_skipped_by_the_dag_on_its_code_and_outcome():
    assert sorted((code, outcome) for _, code, outcome in skip_pairs()) == sorted(
        (c.exit_code, c.outcome) for c in outcome_errors())
    assert dag_constants()["NO_RETRY"] == (errors.QualityGateError.exit_code,)


def test_the_dag_trains_only_the_newest_night_as_the_nightly_does():
    """A backfilled night's train task must refuse (and be skipped), not register an old model."""
    stage_args = dag_constants()["STAGE_ARGS"]
    assert stage_args == {"train": ["--newest-only"]}
    args = cli.build_parser().parse_args(["train", "--date", "2026-11-03", *stage_args["train"]])
    assert args.newest_only is True
    assert ("train", errors.OlderNightError.exit_code, errors.OlderNightError.outcome) in skip_pairs()


def cli_raising(stage: str, error: errors.StreamrankError, monkeypatch) -> int:
    """`streamrank <stage>` whose stage raises `error`: the CLI's own handling and printing."""
    def fail(_args: argparse.Namespace) -> int:
        raise error

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(command=stage, handler=fail))
    return cli.main([stage])


@pytest.mark.parametrize("stage,code,outcome", skip_pairs())
def test_the_line_the_cli_prints_is_the_one_the_dag_reads(stage, code, outcome, monkeypatch, capsys):
    error = next(c for c in outcome_errors() if c.outcome == outcome)
    assert cli_raising(stage, error("an expected state"), monkeypatch) == code
    pattern = re.compile(dag_constants()["OUTCOME"])
    lines = capsys.readouterr().err.splitlines()
    assert [m.group(1) for line in lines if (m := pattern.match(line.strip()))] == [outcome]


@pytest.mark.parametrize("error", [errors.MissingInputError, errors.QualityGateError, errors.ConcurrentWriteError])
def test_a_failure_prints_no_line_the_dag_could_take_for_a_skip(error, monkeypatch, capsys):
    assert cli_raising("score", error("someone must act"), monkeypatch) == error.exit_code
    err = capsys.readouterr().err
    assert "streamrank score: error: someone must act" in err
    assert not [line for line in err.splitlines() if re.compile(dag_constants()["OUTCOME"]).match(line.strip())]
