"""The README's commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_verbatim():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert len(ci_command) == 1
    assert f"\n{ci_command[0]}\n" in (ROOT / "README.md").read_text()


def test_readme_quick_start_uses_the_bundled_example():
    readme = (ROOT / "README.md").read_text()
    for name in ("examples/lumbar_ct.nii.gz", "examples/lumbar_thick5mm.nii.gz"):
        assert name in readme
        assert (ROOT / name).is_file()
