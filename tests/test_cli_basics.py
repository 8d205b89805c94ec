"""The command line's own behaviour: version, info, one-line errors, no torch import."""

import subprocess
import sys

from typer.testing import CliRunner

from vertrefine import __version__
from vertrefine.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"vertrefine {__version__}"


def test_info_lists_versions_and_working_providers():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "SimpleITK" in result.output and "highdicom" in result.output
    assert "CPUExecutionProvider" in result.output


def test_cpu_is_always_a_working_provider_and_cuda_only_when_usable():
    from vertrefine.runtime import CPU, CUDA, cuda_usable, select_providers, working_providers

    assert working_providers()[-1] == CPU
    providers, note = select_providers("cuda")
    if cuda_usable():
        assert providers[0] == CUDA and note is None
    else:
        assert providers == [CPU] and "CUDA" in note
    assert select_providers("cpu") == ([CPU], None)


def test_commands_do_not_import_torch():
    code = (
        "import sys; from vertrefine import cli, io, spatial, synth, degrade, metrics, score, runtime, info;"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
