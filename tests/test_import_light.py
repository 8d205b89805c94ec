"""The training path imports on a machine with torch and numpy only (a bare GPU node): no SimpleITK, rich, typer."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")


def test_training_modules_import_without_simpleitk_rich_or_typer():
    code = (
        "import sys\n"
        "for name in ('SimpleITK', 'rich', 'typer'):\n"
        "    sys.modules[name] = None\n"
        "import vertrefine.train.loop, vertrefine.train.patch_cache, vertrefine.train.dataset\n"
        "import vertrefine.train.validation, vertrefine.train.export, vertrefine.train.objectives\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
