"""docs/your-data.md's walkthrough runs as written (issue 29): its ```bash blocks, in order, in a fresh folder laid
out like the repository (the scripts linked, data/ a folder of its own), each step checked by what it leaves."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import train
from conftest import CPU_ONLY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "your-data.md")


def blocks(kind):
    """The doc's fenced code blocks of one kind (```bash, ```json, ```text), in order."""
    with open(DOC, encoding="utf-8") as f:
        return re.findall(rf"^```{kind}\n(.*?)^```$", f.read(), re.S | re.M)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder where `python train.py` and `python data/tiny/prepare.py` work as in the repository's root, and
    whatever the commands write (data/mine, out-mine-coconut, my_questions.jsonl) stays in the folder."""
    d = tmp_path_factory.mktemp("clone")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "machinery":
            os.symlink(os.path.join(ROOT, name), d / name)
    (d / "data").mkdir()
    for name in os.listdir(os.path.join(ROOT, "data")):
        os.symlink(os.path.join(ROOT, "data", name), d / "data" / name)
    (d / "bin").mkdir()
    os.symlink(sys.executable, d / "bin" / "python")  # the doc's `python` is this interpreter
    return d


def run_block(block, clone):
    env = dict(os.environ, PATH=f"{clone / 'bin'}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", **CPU_ONLY)
    return subprocess.run(["bash", "-e", "-c", block], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_sample_record_is_a_record(tmp_path):
    from machinery.records import load_records
    (record,) = [json.loads(b) for b in blocks("json")]
    path = tmp_path / "one.json"
    path.write_text(json.dumps([record]))
    assert load_records(str(path)) == [record] and len(record["steps"]) == 2


def test_the_walkthrough_runs_as_written(clone):
    prepare, first_run, answers, questions = blocks("bash")
    r = run_block(prepare, clone)
    assert r.returncode == 0, r.stderr
    assert {"train.json", "valid.json", "test.json"} <= set(os.listdir(clone / "data" / "mine"))

    r = run_block(first_run, clone)
    assert r.returncode == 0, r.stderr[-3000:]
    run = clone / "out-mine-coconut"
    assert {"best.pt", "ckpt.pt", "metrics.jsonl"} <= set(os.listdir(run))
    stages = [json.loads(line)["stage"] for line in open(run / "metrics.jsonl")]
    assert stages[0] == 0 and stages[-1] > 2  # the whole curriculum, up to the last stage
    assert "last, 2 thoughts" in r.stdout  # the stage table's last row

    r = run_block(answers, clone)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Q: ") == 3 and re.search(r"^\s+2 \(default\)\s+[\d.]+%\s+\d+/10 ", r.stdout, re.M)
    assert "thought 1: " in r.stdout or "note: out-mine-coconut/best.pt was saved at stage 0" in r.stdout

    r = run_block(questions, clone)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 question(s)" in r.stdout and re.search(r"accuracy \d/2 ", r.stdout)
    assert r.stdout.count("  thought 2: ") == 3 and "warning" not in r.stdout  # 2 from the file, 1 typed in


def test_the_full_run_command_is_valid(clone, monkeypatch):
    (full,) = blocks("text")
    argv = shlex.split(full)
    assert argv[:2] == ["python", "train.py"]
    monkeypatch.chdir(clone)
    args = train.parse_args(argv[2:])
    assert (args.dataset, args.init_from, args.max_latent_stage, args.n_layer, args.n_embd) == ("mine", "scratch", 2,
                                                                                                2, 128)
