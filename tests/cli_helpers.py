"""Running the command line in tests as a user sees it: every argument a string, a wide console."""

from typer.testing import CliRunner

from vertrefine.cli import app

runner = CliRunner()


def invoke(*args):
    """``vertrefine ARGS...`` in-process; paths and numbers may be passed as they are."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def error_line(result) -> str:
    """The one ``error:`` line of a refused command (and no traceback)."""
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]
