"""The README's test command is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    marker = "**2. Install the test dependencies and run the tests**"
    block = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert block in ci.splitlines()
