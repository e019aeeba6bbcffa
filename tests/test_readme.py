"""The README's two commands stay true: CI runs exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert ci.startswith("python3 -m venv")
    assert ci in readme


def test_readme_main_job_uses_xctrt_segment_on_the_default_model():
    readme = (ROOT / "README.md").read_text()
    main = next(line for line in readme.splitlines() if "xctrt segment" in line and line.startswith("python3"))
    assert "-m " not in main.split("xctrt segment", 1)[1]  # no model given: the embedded default
