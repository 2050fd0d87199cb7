"""bench.py --superposition: our side of one epoch of the "Reasoning by Superposition" setting on a tiny model
(the authors' checkout is not needed), its printed numbers and FLOP estimate, and the conversion of our graph
records to the authors' format. Offline, a few seconds."""
import json
import os
import re
import subprocess
import sys
from collections import deque

import pytest

from machinery import bench
from conftest import CPU_ONLY
from gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([0-9.]+(?:e[+-]?[0-9]+)?)"


def run_bench(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", **CPU_ONLY)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "machinery", "bench.py"), "--superposition", "ours", "--sp_small",
                        "--device", "cpu", "--threads", "1", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def field(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return m.groups()


def check_output(out, n_train, tflops_assumed=bench.SP_GPU_TFLOPS):
    train_s, val_s = map(float, field(r"ours: .*training epoch ([0-9.]+) s .*validation ([0-9.]+) s", out))
    assert train_s > 0 and val_s > 0
    acc, correct, total = field(r"ours: .*accuracy ([0-9.]+)% \((\d+)/(\d+)\)", out)
    assert 0 <= float(acc) <= 100 and int(total) > 0 and 0 <= int(correct) <= int(total)
    assert float(acc) == pytest.approx(100 * int(correct) / int(total), abs=0.005)
    (sequences,) = field(r"data, ours: (\d+) training sequences", out)
    assert int(sequences) == n_train
    assert not re.search(r"theirs:|theirs/ours|same data", out)  # our side alone: no line of theirs

    # the parameter count is the tiny GPT's, recounted here from its shape and the printed vocabulary
    params, vocab, block = map(int, field(r"ours: P=(\d+) parameters \(vocabulary (\d+), block (\d+)\)", out))
    gpt = GPT(GPTConfig(**bench.SP_SMALL, vocab_size=vocab, block_size=block))
    assert params == sum(p.numel() for p in gpt.parameters())

    # the FLOP estimate, recomputed from the printed parameter count and token counts
    p2, tokens, seqs, train_f, val_tokens, questions, val_f, total_f = field(
        rf"6 x P=(\d+) params x {NUM} tokens/sequence x (\d+) sequences = {NUM} FLOP training \+ 2 x P x {NUM} "
        rf"tokens/question x (\d+) questions = {NUM} FLOP validation = {NUM} FLOP total", out)
    assert int(p2) == params
    assert int(seqs) == 14785 * 300 and int(questions) == 257 * 300
    (per_seq,) = field(rf"data, ours: \d+ training sequences, {NUM} tokens/sequence", out)
    assert float(tokens) == pytest.approx(float(per_seq), abs=0.005) and float(tokens) > 50
    (prompt,) = field(rf"{NUM} prompt tokens/validation question", out)
    assert float(val_tokens) == pytest.approx(float(prompt) + 3, abs=0.01)
    want_train = 6 * params * float(tokens) * 14785 * 300
    want_val = 2 * params * float(val_tokens) * 257 * 300
    assert float(train_f) == pytest.approx(want_train, rel=1e-4)
    assert float(val_f) == pytest.approx(want_val, rel=1e-4)
    assert float(total_f) == pytest.approx(want_train + want_val, rel=1e-4)
    tflops, seconds = field(rf"at an assumed sustained {NUM} TFLOP/s.* that is (\d+) s", out)
    assert float(tflops) == tflops_assumed
    assert int(seconds) == round((want_train + want_val) / (float(tflops) * 1e12))
    assert "not a measurement" in out


def test_superposition_ours_generated_data():
    out = run_bench("--sp_train", "12", "--sp_valid", "6", "--sp_batch", "8")
    check_output(out, 12)
    assert "one epoch = 2 AdamW steps of batch 8" in out  # 12 graphs: a step of 8, then the short one of 4
    assert "ours: P=" in out and "2 steps" in out


def test_superposition_ours_reads_data_folder(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "prosqa_graph", "prepare.py"), "--generate",
                    "--n_train", "20", "--n_valid", "5", "--n_test", "0", "--seed", "3", "--permute",
                    "--out_dir", str(tmp_path)], check=True, capture_output=True)
    out = run_bench("--data", str(tmp_path), "--sp_train", "8", "--sp_valid", "4", "--sp_batch", "4",
                    "--sp_stage", "2", "--sp_gpu_tflops", "50")
    check_output(out, 8, 50)  # the first 8 of the 20 graphs
    assert f"read from {tmp_path}" in out and "stage 2" in out


def test_superposition_bad_checkout_stops_at_once(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "machinery", "bench.py"), "--superposition", str(tmp_path)],
                       cwd=ROOT, env=dict(os.environ, **CPU_ONLY), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a checkout of Ber666/reasoning-by-superposition" in r.stderr
    assert "[superposition]" not in r.stdout  # before any data or training


def distances(children, src):
    """Shortest hops from src (written again here, independently of analysis.py)."""
    dist, queue = {src: 0}, deque([src])
    while queue:
        u = queue.popleft()
        for v in children.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def test_superposition_record_matches_their_format():
    # root r=0 -> a=1, b=2; a -> c=3; b -> c; c -> t=4 (target); b -> n=5 (the other option); 6 unconnected.
    # Two shortest paths 0-1-3-4 and 0-2-3-4. Node i is named by the symbol names[i] (as prepare.py --permute).
    names = ["17", "3", "30", "8", "0", "12", "5"]
    edges = [[0, 1], [0, 2], [1, 3], [2, 3], [3, 4], [2, 5]]
    r = dict(question="unused", steps=["3", "8", "0"], answer="0", idx_to_symbol=names, edges=edges, root=0,
             target=4, neg_target=5)
    s = bench.superposition_record(r)
    ids = [int(x) for x in names]
    assert s["edges"] == [[ids[a], ids[b]] for a, b in edges]
    assert (s["root"], s["target"], s["neg_target"]) == (17, 0, 12)
    assert len(s["steps"]) == 3 and s["idx_to_symbol"][30] == "30"
    assert s["neighbor_k"] == {"0": [17], "1": [3, 30], "2": [8], "3": [0]}
    json.dumps(s)  # their dataset.py reads it from a JSON file

    # the definition, independently: hop-k nodes v with depth(v) + distance(v, target) = depth(target)
    children, parents = {}, {}
    for a, b in s["edges"]:
        children.setdefault(a, []).append(b)
        parents.setdefault(b, []).append(a)
    down, up = distances(children, s["root"]), distances(parents, s["target"])
    D = down[s["target"]]
    for k in range(D + 1):
        assert s["neighbor_k"][str(k)] == sorted(v for v in down if down[v] == k and v in up and k + up[v] == D)


@pytest.mark.multiprocess
def test_fsdp_counts_and_times_against_ddp():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "machinery", "bench.py"), "--fsdp", "2", "--sizes", "tiny",
                        "--threads", "1", "--thoughts", "3", "--fsdp_micro", "2", "--repeats", "1", "--warmup", "0",
                        "--device", "cpu"],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **CPU_ONLY), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "[tiny] FSDP over 2 processes (cpu, float32, 1 thread(s) each" in out and "2 blocks" in out
    # gathered once per step: 2 blocks + the root; the default: per micro-batch, the root once and each block
    # for every pass (3 thoughts: 4 passes), forward and backward
    ours, default, rs1, rs2 = map(int, field(r"all-gathers per step: train.py --fsdp \(gathered once per step\) (\d+) "
                                             r".*fully_shard's default (\d+) .*reduce-scatters (\d+) and (\d+)", out))
    assert (ours, default, rs1, rs2) == (3, 2 * (1 + 2 * 2 * 4), 2 * 3, 2 * 3)
    fsdp_s, default_s, ddp_s, ratio, ratio_default = map(float, field(  # ms, two decimals: the ratios hold to 0.01
        rf"step time: --fsdp {NUM} ms, default {NUM} ms, DDP {NUM} ms -> "
        rf"\(d\) --fsdp/DDP = {NUM}x, default/DDP = {NUM}x", out))
    assert min(fsdp_s, default_s, ddp_s) > 0
    assert ratio == pytest.approx(fsdp_s / ddp_s, abs=0.01) and ratio_default == pytest.approx(default_s / ddp_s, abs=0.01)
    assert "the same losses: True" in out  # the three ways train alike
    fsdp_mib, ddp_mib = map(float, field(rf"per process: FSDP {NUM} MiB, DDP {NUM} MiB", out))
    assert fsdp_mib == pytest.approx(ddp_mib / 2, rel=0.02)


def test_the_demo_step_where_read_and_everywhere():
    # (e): the demo's three steps, the last block only in the columns that are read against every column: fewer
    # FLOPs for each method (counted, so this holds on any machine), and the timings printed beside them
    env = dict(os.environ, OMP_NUM_THREADS="1", **CPU_ONLY)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "machinery", "bench.py"), "--demo_step", "--threads", "1",
                        "--repeats", "1", "--warmup", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"matmul runs at [0-9.]+ GFLOP/s", r.stdout)
    for mode in ("coconut", "cot", "nocot"):
        read, every, ms_read, ms_every, ratio = map(float, field(rf"\n\s*{mode}" + rf"\s+{NUM}" * 5, r.stdout))
        assert 0.5 * every < read < 0.9 * every  # the last of two blocks skips most columns
        assert ms_read > 0 and ms_every > 0 and ratio == pytest.approx(ms_read / ms_every, abs=0.01)


def test_the_demo_step_against_a_commit_and_by_op():
    # issue 29: --against REV times coconut.py at a commit against today's, alternating, and checks that the two
    # train bit for bit alike (HEAD: the same code, in a clean checkout); --profile gives the time by op and the
    # one-column passes' share
    env = dict(os.environ, OMP_NUM_THREADS="1", **CPU_ONLY)
    bench = [sys.executable, os.path.join(ROOT, "machinery", "bench.py"), "--demo_step", "--threads", "1"]
    r = subprocess.run(bench + ["--against", "HEAD", "--repeats", "1", "--warmup", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, now, paired = map(float, field(rf"HEAD {NUM}, now {NUM}; now / HEAD, the median of paired "
                                           rf"steps: {NUM};", r.stdout))
    assert before > 0 and now > 0 and 0.2 < paired < 5
    assert "losses and weights bit-identical after 8 steps: True" in r.stdout
    r = subprocess.run(bench + ["--against", "no-such-rev"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--against no-such-rev" in r.stderr
    r = subprocess.run(bench + ["--profile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shares = [float(x) for x in re.findall(r"([0-9.]+)%", r.stdout.split("by op: ")[1].splitlines()[0])]
    assert len(shares) == 10 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.1
    assert re.search(r"one-column thought passes \(ops with a one-column input\): [0-9.]+% of the time, \d+ calls",
                     r.stdout)


def test_the_memory_estimate_is_above_a_measured_step():
    # machinery/memory.py's estimate (what train.py picks its micro-batch by) against the peak that one step of a
    # 4-block, 256-wide Coconut adds, measured in a fresh process: above it, and not by more than twice
    r = subprocess.run([sys.executable, os.path.join(ROOT, "machinery", "bench.py"), "--memory_estimate", "16:200:6:40",
                        "--sizes", "small", "--threads", "1"], cwd=ROOT, env=dict(os.environ, **CPU_ONLY),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    measured, estimated, ratio = map(float, field(rf"16 x 248 columns \(6 thoughts, 40 answer tokens\): measured {NUM} "
                                                  rf"GiB, estimated {NUM} GiB -> estimate/measured = {NUM}", r.stdout))
    assert measured > 0.1 and 1.0 <= ratio <= 2.0 and ratio == pytest.approx(estimated / measured, abs=0.01)
