"""benchmarks/gpu_check.py: the wheel list against the project's dependencies, the stage harness (failures logged,
the next stage going on, deadlines, what comes back), bad input, and the whole check as a CPU dry run."""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check import Stage  # noqa: E402

def test_the_wheels_are_what_the_project_needs_and_the_gpu_image_lacks():
    walked = gpu_check.walk_requirements(gpu_check.project_requirements())
    names = {gpu_check.canonical(requirement.name) for requirement, _ in walked}
    not_here = sorted(str(r) for r, version in walked if version is None)
    assert not not_here, f"not installed here, so their own requirements are unknown: {not_here}"
    lacking = names - gpu_check.GPU_IMAGE_PACKAGES
    assert set(gpu_check.WHEELS) == lacking | gpu_check.CARRIED_FOR_VERSION
    assert gpu_check.CARRIED_FOR_VERSION <= names & gpu_check.GPU_IMAGE_PACKAGES
    # --make-wheels pins the versions installed here: they must satisfy what the carried packages ask of each other
    unmet = [f"{r} ({version})" for r, version in walked
             if gpu_check.canonical(r.name) in gpu_check.WHEELS and not r.specifier.contains(version, prereleases=True)]
    assert not unmet


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\tZ" not in next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False


def test_a_failing_stage_is_logged_with_its_traceback_and_the_next_goes_on(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    hang = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid)); print('waiting', flush=True); "
            "time.sleep(60)")
    stages = [
        Stage("hangs", 3, ("{python}", "-c", hang, "{work}/child.pid")),
        Stage("no_time", 0.0001, ("{python}", "-c", "pass")),  # its deadline passed while "hangs" ran
        Stage("raises", 1, ("{python}", "-c", "def deep(): raise ValueError('boom')\ndeep()")),
        Stage("missing", 1, ("{python}", "benchmarks/no_such_script.py")),
        Stage("writes", 1, ("{python}", "-c", "import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))",
                            "{work}/{card}.json", "{budget}"), figures=("{card}.json",), keep=("{card}.json",)),
        Stage("needs_input", 1, ("{python}", "-c", "pass"), needs=("{work}/never-written.yaml",)),
    ]
    values = gpu_check.placeholders(work, "Test Card", None)
    meta = {"card": "Test Card", "date": "2026-12-01", "dry_run": True, "budget_s": 7.0, "command": "test",
            "commit": None}
    outcomes, logs = gpu_check.run_check(
        stages, dry_run=True, budget_s=7.0, work=work, values=values, min_stage_s=0.5,
        on_stage=lambda _, done, logs: gpu_check.write_outputs(out, meta, stages, done, logs, work, values))
    status = {o.name: o.status for o in outcomes}
    assert status == {"hangs": "timeout", "no_time": "skipped", "raises": "failed", "missing": "missing",
                      "writes": "ok", "needs_input": "skipped"}
    by_name = {o.name: o for o in outcomes}
    assert 2.5 < by_name["hangs"].seconds < 3 + 11  # its share of the budget, then SIGINT, SIGKILL within 10 s
    assert not alive(int((work / "child.pid").read_text())), "the stage's child outlived it"
    assert "KeyboardInterrupt" in logs["hangs"] and "waiting" in logs["hangs"]
    assert by_name["raises"].returncode == 1 and by_name["raises"].note == "ValueError: boom"
    assert "Traceback (most recent call last)" in logs["raises"] and "in deep" in logs["raises"]
    assert by_name["writes"].command[-1].isdigit()  # {budget}: whole seconds
    log = (out / "check.log").read_text()
    assert "ValueError: boom" in log and "no benchmarks/no_such_script.py in this checkout" in log
    figures = json.loads((out / "figures.json").read_text())
    assert [s["name"] for s in figures["stages"]] == [stage.name for stage in stages]
    assert figures["figures"]["writes"] == {"test-card.json": {"x": 1}}
    summary = (out / "summary.md").read_text()
    assert "| raises | failed |" in summary and "needs " + str(work / "never-written.yaml") in summary
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "figures.json", "summary.md", "test-card.json"]


def test_bad_input_gets_one_message_and_exit_2(tmp_path, capsys):
    def error(*argv: str) -> str:
        assert gpu_check.main(list(argv)) == 2
        return capsys.readouterr().err

    assert "no stage nope" in error("--dry-run", "--stages", "nope,kernels", "--out", str(tmp_path / "a"))
    assert "--budget-s must be positive" in error("--dry-run", "--budget-s", "0")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.md").write_text("x")
    assert "not an empty folder" in error("--dry-run", "--out", str(tmp_path / "full"))
    assert "no .whl files" in error("--dry-run", "--wheels", str(tmp_path))
    if gpu_check.gpu_card() is None:
        assert "no NVIDIA GPU here" in error("--out", str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# The dry run itself is the session's `gpu_check_dry_run` (tests/conftest.py): the executor tests take its profile.
def test_the_dry_run_returns_at_most_8_files_with_the_card_date_and_versions(gpu_check_dry_run):
    done, out = gpu_check_dry_run
    assert done.returncode in (0, 1), done.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= gpu_check.MAX_OUT_FILES
    assert all(len(p.relative_to(out).parts) <= 3 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"# dry run on the CPU: cpu, {datetime.date.today().isoformat()}")
    assert re.search(r"Python 3\.\d+\.\d+; torch \S+ \(CUDA None\); triton \S+", summary)
    assert summary in done.stdout  # the check prints its summary
    figures = json.loads((out / "figures.json").read_text())
    assert [s["name"] for s in figures["stages"]] == [stage.name for stage in gpu_check.STAGES]
    assert figures["figures"]["environment"]["environment.json"]["requirement_problems"] == []
    assert (out / "cpu-quick.yaml").is_file()


@pytest.mark.parametrize("stage", [s.name for s in gpu_check.STAGES])
def test_every_stage_passes_in_the_dry_run(gpu_check_dry_run, stage):
    done, out = gpu_check_dry_run
    outcome = next(s for s in json.loads((out / "figures.json").read_text())["stages"] if s["name"] == stage)
    assert outcome["status"] == "ok", (outcome, (out / "check.log").read_text()[-6000:])
