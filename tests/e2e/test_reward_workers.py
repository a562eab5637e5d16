"""MathReward's worker processes: copies and pickles leave the pool behind, nothing outlives close() or the
interpreter, and workers that cannot start stop the caller with the fix."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mgrpo_pl.rewards import MathReward

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reward():
    with MathReward(timeout_s=1.0, num_workers=2) as shared:
        yield shared


def test_copy_and_pickle_leave_the_pool_behind(reward):
    reward(["\\boxed{1}"], ["1"])  # make sure the original has a running pool
    restored = pickle.loads(pickle.dumps(reward))
    assert repr(restored) == repr(reward)
    assert restored.stats() == reward.stats()
    with copy.deepcopy(reward) as clone:
        assert clone(["\\boxed{2}", "\\boxed{3}"], ["2", "2"]).tolist() == [1.0, 0.0]
    # The clone's pool was its own: closing it left the original working.
    assert reward(["\\boxed{5}"], ["5"]).tolist() == [1.0]


_CHILD_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, os, sys

    import mgrpo_pl.rewards
    from mgrpo_pl.rewards import MathReward

    def workers():
        return sorted(p.pid for p in multiprocessing.active_children() if p.name == "pebble_pool_worker")

    def descendants():
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if fields[0] != "Z":
                    parents[int(entry)] = (int(fields[1]), cmdline)
        found, frontier = {}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, cmdline) in parents.items():
                if ppid == parent and pid not in found:
                    found[pid] = cmdline
                    frontier.append(pid)
        return found

    if __name__ == "__main__":
        report = {"torch_imported": "torch" in sys.modules}
        reward = MathReward(timeout_s=1.0, num_workers=1)
        report["first"] = reward(["\\\\boxed{3}"], ["3"]).tolist()
        report["workers_before_close"] = workers()
        reward.close()
        report["workers_after_close"] = workers()
        # multiprocessing's own forkserver and resource tracker outlive close(); nothing else may.
        report["other_descendants"] = sorted(
            cmd for cmd in descendants().values() if "forkserver" not in cmd and "resource_tracker" not in cmd
        )
        unclosed = MathReward(timeout_s=1.0, num_workers=1)
        report["second"] = unclosed(["\\\\boxed{4}"], ["5"]).tolist()
        report["unclosed_workers"] = workers()
        print(json.dumps(report))
        # exit without close(): the finalizer must stop the worker
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_close_and_interpreter_exit_leave_no_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch_imported"] is False  # workers import this package: it must stay torch-free
    assert report["first"] == [1.0] and report["second"] == [0.0]
    assert len(report["workers_before_close"]) == 1
    assert report["workers_after_close"] == []
    assert report["other_descendants"] == []
    assert len(report["unclosed_workers"]) == 1
    pids = report["workers_before_close"] + report["unclosed_workers"]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


_BROKEN_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, time

    # A script that cannot be imported by a worker process (spawn and forkserver workers re-import __main__).
    if multiprocessing.current_process().name == "pebble_pool_worker":
        raise RuntimeError("this script cannot be imported by a worker")

    from mgrpo_pl.rewards import MathReward

    if __name__ == "__main__":
        with MathReward(timeout_s=1.0, num_workers=1) as reward:
            calls = []
            for _ in range(2):
                start = time.monotonic()
                scores = reward(["\\boxed{1}", "\\boxed{2}"], ["1", "2"]).tolist()
                calls.append({"scores": scores, "elapsed": time.monotonic() - start})
            print(json.dumps({"calls": calls, "stats": reward.stats()}))
    """
)


def _python(args, tmp_path, stdin=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )


def test_workers_that_cannot_start_stop_the_caller_with_the_fix(tmp_path):
    # Every item scoring 0 with only a warning would let a training run go on learning nothing.
    script = tmp_path / "broken.py"
    script.write_text(_BROKEN_SCRIPT)
    done = _python([str(script)], tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mgrpo_pl.rewards.base.RewardError: MathReward's worker processes cannot start"), last
    assert 'if __name__ == "__main__":' in last and 'start_method="fork"' in last
    assert "scores" not in done.stdout  # no result was returned


_SCORE_TWO = (
    "from mgrpo_pl.rewards import MathReward\nprint(MathReward()(['\\\\boxed{12}', 'it is 7'], ['12', '7']).tolist())\n"
)


def test_code_without_a_script_file(tmp_path):
    # `python -c` (and notebooks) have no main file for workers to import: they work.
    done = _python(["-c", _SCORE_TWO], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[1.0, 1.0]"
    # `python -` names "<stdin>" as its main file, which workers cannot import: the error says what to do.
    done = _python(["-"], tmp_path, stdin=_SCORE_TWO)
    assert done.returncode != 0 and "RewardError" in done.stderr and 'start_method="fork"' in done.stderr
    # ... and with the fix it names, the same code works.
    done = _python(["-"], tmp_path, stdin=_SCORE_TWO.replace("MathReward()", 'MathReward(start_method="fork")'))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[1.0, 1.0]"


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        MathReward(num_workers=0)
    with pytest.raises(ValueError, match="start_method"):
        MathReward(start_method="threads")
