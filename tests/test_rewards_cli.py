"""`python -m rewards check` on real files, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"id": "a", "images": ["img/a.png"], "question": "Diagnosis?", "options": ["Adenoma", "Carcinoma"], "answer": "B",
     "data_source": "demo"},
    {"id": "b", "images": [], "question": "Diagnosis?", "options": ["Adenoma", "Carcinoma"], "answer": "A",
     "data_source": "demo"},
    {"id": "c", "images": [], "question": "Diagnosis?", "options": ["Adenoma", "Carcinoma"], "answer": "A",
     "data_source": "demo"},
]
RESPONSES = [{"response": "<think>x</think><answer>B</answer>", "response_length": 12},
             {"response": "<think>x</think><answer>B</answer>"},
             {"response": "<think>x</think><answer>A</answer>", "truncated": True}]
REWARD = '''
import os
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if extra_info["id"] == "c":
        raise RuntimeError("cannot score c")
    assert os.path.isabs(extra_info["images"][0]) if extra_info["images"] else True
    return {"score": float(ground_truth in solution_str), "chars": len(solution_str)}
'''


def write(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESPONSES))
    (tmp_path / "my_reward.py").write_text(REWARD)


def run(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "rewards", "check", *args, "--rows", "rows.jsonl",
                           "--responses", "responses.jsonl"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_check_builtin_prints_scores_and_timing(tmp_path):
    write(tmp_path)
    result = run(tmp_path, "mc_accuracy")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["sample 0 (id a): score 1", "sample 1 (id b): score 0", "sample 2 (id c): score 1"]
    assert lines[3].startswith("3 samples, 0 error(s), mean score 0.666667;") and "s wall" in lines[3]


def test_check_user_file_json_reports_errors(tmp_path):
    write(tmp_path)
    result = run(tmp_path, "my_reward.py:compute_score", "--json")
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and [r["id"] for r in records] == ["a", "b", "c"]
    assert records[0]["score"] == 1.0 and records[0]["error"] is None and records[0]["metrics"]["chars"] == 34
    assert records[1]["score"] == 0.0
    assert records[2]["score"] is None and "RuntimeError: cannot score c" in records[2]["error"]
    assert "1 error(s)" in result.stderr and "(verl style)" in result.stderr


def test_check_bad_input_exits_2(tmp_path):
    write(tmp_path)
    (tmp_path / "responses.jsonl").write_text(json.dumps(RESPONSES[0]) + "\n")
    result = run(tmp_path, "mc_accuracy")
    assert result.returncode == 2 and "3 rows but" in result.stderr
    write(tmp_path)
    result = run(tmp_path, "my_reward.py:missing")
    assert result.returncode == 2 and "has no function 'missing'" in result.stderr


def test_check_verl_and_easyr1_rows_as_in_training(tmp_path):
    """A verl reward on verl rows gets reward_model.ground_truth as stored (an int) and extra_info;
    an EasyR1 row's problem and answer serve as question and ground truth; image structs pass."""
    rows = [{"prompt": [{"role": "user", "content": "<image>How many mitoses?"}], "data_source": "counts",
             "images": [{"bytes": None, "path": "img/a.png"}], "reward_model": {"ground_truth": 3},
             "extra_info": {"split": "val"}},
            {"problem": "<image>How many mitoses?", "answer": 4, "images": ["img/b.png"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "responses.jsonl").write_text(json.dumps({"response": "3"}) + "\n" + json.dumps({"response": "4"}) + "\n")
    (tmp_path / "count.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(str(int(solution_str)) == str(ground_truth)) + (0.5 if extra_info.get('split') == 'val' else 0)\n")
    result = run(tmp_path, "count.py:compute_score", "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["score"] for line in result.stdout.splitlines()] == [1.5, 1.0]
    (tmp_path / "rows.jsonl").write_text(json.dumps({**rows[0], "reward_model": {"ground_truth": None}}) + "\n")
    (tmp_path / "responses.jsonl").write_text(json.dumps({"response": "3"}) + "\n")
    result = run(tmp_path, "count.py:compute_score")
    assert result.returncode == 2 and "line 1: the ground truth must be" in result.stderr
