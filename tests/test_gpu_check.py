"""gpu_check.py: its --smoke version runs every section on a CPU (the CUDA-only parts say skipped), a failing
section prints one FAILED line and the next one runs, and on a GPU the numerics pass."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import CPU_ONLY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_check(*flags, out=None, timeout=300, cpu=True):
    """gpu_check.py in a process of its own: on the CPU alone (no CUDA device visible) unless cpu=False."""
    env = dict(os.environ, PYTHONPATH=ROOT, **(CPU_ONLY if cpu else {}))  # TIKTOKEN_CACHE_DIR: conftest.py
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run([sys.executable, os.path.join(ROOT, "machinery", "gpu_check.py"), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = gpu_check("--smoke", "--device", "cpu", out=out)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, out


def test_smoke_runs_every_section(smoke):
    text, _ = smoke
    for i, name in enumerate(["environment", "numerics", "timing", "fsdp", "run"], 1):
        assert f"\n== {i}. {name}\n" in text
        assert re.search(rf"^-- {name}: [\d.]+ s$", text, re.M)
    assert "FAILED" not in text
    assert re.search(r"^bf16 autocast: loss .*: PASS", text, re.M)  # bf16 autocast runs on a CPU too
    assert re.search(r"^fp32 eager: training step [\d.]+ ms; generation [\d.]+ questions/s$", text, re.M)
    assert re.search(r"^the full recipe \(300 epochs, batch 256\) .* about \d+ min", text, re.M)


def test_smoke_fsdp_section(smoke):
    # the CPU twin of the GPU's FSDP section: a one-rank gloo group, parallel.shard (fp32 weights: the bf16 policy
    # runs on CUDA only, as in train.py), the same step as without FSDP, a sharded save and load
    text, out = smoke
    assert "process group gloo, world 1; parallel.shard with fp32 weights" in text
    step = re.search(r"^fsdp step: loss ([\d.]+) vs ([\d.]+) without FSDP .*: PASS", text, re.M)
    loss, ref = map(float, step.groups())
    assert loss == pytest.approx(ref, rel=1e-5) and loss > 0
    n = re.search(r"^fsdp sharded save [\d.]+ s, load [\d.]+ s: identical tensors (\d+)/\1: PASS$", text, re.M)
    assert n and int(n.group(1)) > 10
    results = json.loads((out / "results.json").read_text())["fsdp"]
    assert results["ok"] and results["identical"] == results["tensors"] and results["backend"] == "gloo"


def test_smoke_stage_table(smoke):
    text, _ = smoke
    rows = re.findall(r"^\s+(\d+)\s+\d+-\d+\s+([\d.]+)%\s+[\d.]+\s+\d+$", text, re.M)
    assert [int(s) for s, _ in rows] == [0, 1, 2, 3, 4]
    assert all(0 <= float(a) <= 100 for _, a in rows)


def test_smoke_cuda_parts_say_skipped(smoke):
    text, _ = smoke
    for line in ("CUDA: skipped (no CUDA)", "fp32 compile:  skipped (no CUDA)", "fp32 compile skipped (no CUDA)",
                 "bf16 + compile: skipped (no CUDA)", "peak GPU memory: skipped (no CUDA)",
                 "fsdp peak GPU memory: skipped (no CUDA)"):
        assert line in text


def test_smoke_out_files(smoke):
    text, out = smoke
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "metrics.jsonl", "results.json", "train.log"]  # at most 8
    assert (out / "gpu_check.log").read_text() == text  # the same lines as printed
    results = json.loads((out / "results.json").read_text())
    assert results["numerics"]["bf16 autocast"]["ok"] and len(results["run"]["stages"]) == 5
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5  # 1 epoch per stage


def test_symbolic_fallback():
    # what a GPU machine without tiktoken's files does: sections 2-3 on the prosqa_graph records
    r = gpu_check("--smoke", "--device", "cpu", "--symbols", "--skip", "run")
    assert r.returncode == 0, r.stderr
    assert "symbolic prosqa_graph records" in r.stdout and "FAILED" not in r.stdout
    assert re.search(r"^bf16 autocast: loss .*: PASS", r.stdout, re.M) and "== 5. run" not in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_section_does_not_stop_the_next():
    r = gpu_check("--smoke", "--device", "cuda", "--skip", "run")
    assert r.returncode == 0, r.stderr
    failed = re.findall(r"^FAILED: .+$", r.stdout, re.M)
    assert len(failed) == 3 and r.stdout.index("== 3. timing") > r.stdout.index(failed[0])  # numerics, timing, fsdp
    assert r.stdout.index("== 4. fsdp") > r.stdout.index(failed[1])


def test_unknown_section():
    r = gpu_check("--skip", "nope")
    assert r.returncode == 2 and "unknown section" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_numerics_pass_on_gpu():
    r = gpu_check("--skip", "timing,run", timeout=600, cpu=False)
    assert r.returncode == 0, r.stderr
    assert "FAILED" not in r.stdout and " FAIL " not in r.stdout
    assert re.search(r"^bf16 autocast: loss .*: PASS", r.stdout, re.M)
    assert re.search(r"^fp32 compile: loss .*: PASS", r.stdout, re.M)
    assert re.search(r"fp32 compile vs eager identical (\d+)/\1: PASS", r.stdout)
    # the FSDP section on the GPU: nccl, the bf16 policy, the same step as without FSDP, a sharded save and load
    assert "process group cpu:gloo,cuda:nccl, world 1; parallel.shard with bf16 weights" in r.stdout
    assert re.search(r"^fsdp step: .*: PASS", r.stdout, re.M)
    assert re.search(r"^fsdp peak GPU memory of the step: [\d.]+ GiB, without FSDP [\d.]+ GiB$", r.stdout, re.M)
    assert re.search(r"^fsdp sharded save .*identical tensors (\d+)/\1: PASS$", r.stdout, re.M)
