"""data/prosqa_graph/prepare.py: the symbolic ProsQA (3-4 hops, one symbol a node). Offline, fast.

Downloads are tested against a small HTTP server this file starts on 127.0.0.1.
"""
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
from collections import deque

import pytest

import data.prosqa.prepare as prosqa
import data.prosqa_graph.prepare as graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
PROSQA_VALID = os.path.join(SHARED, "prosqa_valid.json")
KEYS = {"question", "steps", "answer", "idx_to_symbol", "edges", "root", "target", "neg_target"}


def distances(edges, n, src):
    """Shortest distances from src (written here again, independently of the code under test)."""
    children = [[] for _ in range(n)]
    for p, c in edges:
        children[p].append(c)
    dist, queue = {src: 0}, deque([src])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def check_graph(r):
    """Everything a ProsQA graph record promises."""
    assert set(r) == KEYS
    sym, edges, root, target, neg = r["idx_to_symbol"], r["edges"], r["root"], r["target"], r["neg_target"]
    n = len(sym)
    assert n <= 31 and len(set(sym)) == n and all(isinstance(s, str) and re.fullmatch(r"\S+", s) for s in sym)
    index = {s: i for i, s in enumerate(sym)}
    # the question: "a b | c d | ... [Q] o1 o2 [R] root", every edge exactly once, in names
    m = re.fullmatch(r"(\S+ \S+(?: \| \S+ \S+)*) \[Q\] (\S+) (\S+) \[R\] (\S+)", r["question"])
    assert m, r["question"]
    written = [tuple(index[s] for s in pair.split(" ")) for pair in m.group(1).split(" | ")]
    assert sorted(written) == sorted(map(tuple, edges)) and len(set(written)) == len(written)
    assert {index[m.group(2)], index[m.group(3)]} == {target, neg} and index[m.group(4)] == root
    # the answer is 3-4 hops away, the wrong option out of reach
    dist = distances(edges, n, root)
    assert dist.get(target) in (3, 4) and neg not in dist
    # the steps: one node name a hop, along real edges, as short as any, ending at the target
    path = [root] + [index[s] for s in r["steps"]]
    assert len(r["steps"]) == dist[target] and path[-1] == target
    assert all([a, b] in edges for a, b in zip(path, path[1:]))
    assert r["answer"] == sym[target]


def run(tmp, *argv):
    out = {}
    assert graph.main([*argv, "--out_dir", str(tmp)]) == 0
    for split in ("train", "valid", "test"):
        if os.path.exists(tmp / f"{split}.json"):
            out[split] = json.load(open(tmp / f"{split}.json"))
    return out


SMALL = ["--generate", "--n_train", "60", "--n_valid", "10", "--n_test", "10"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return run(tmp_path_factory.mktemp("gen"), *SMALL, "--seed", "1")


def test_generated_records_keep_every_invariant(generated):
    assert {k: len(v) for k, v in generated.items()} == {"train": 60, "valid": 10, "test": 10}
    every = [r for split in generated.values() for r in split]
    for r in every:
        check_graph(r)
        assert r["idx_to_symbol"] == [str(i) for i in range(len(r["idx_to_symbol"]))]  # default names: indices
    assert {len(r["steps"]) for r in every} == {3, 4} and {r["root"] for r in every} == {0, 1}
    assert any(r["target"] < r["neg_target"] for r in every) and any(r["target"] > r["neg_target"] for r in every)


def test_the_checker_catches_broken_records(generated):
    r = generated["train"][0]
    sym = r["idx_to_symbol"]
    first = r["question"].split(" | ")[0]
    for bad in (dict(r, answer=sym[r["neg_target"]]),                              # names the wrong option
                dict(r, steps=r["steps"][:-1]),                                      # stops short
                dict(r, target=r["neg_target"], neg_target=r["target"]),             # options swapped
                dict(r, question=r["question"].replace(first + " | ", "", 1)),      # an edge left out
                dict(r, idx_to_symbol=["a b"] + sym[1:])):                           # a name of two symbols
        with pytest.raises((AssertionError, KeyError)):
            check_graph(bad)


def test_permute_names_nodes_by_random_ids(tmp_path):
    out = run(tmp_path, *SMALL, "--seed", "1", "--permute")
    every = [r for split in out.values() for r in split]
    for r in every:
        check_graph(r)
        assert set(r["idx_to_symbol"]) <= {str(i) for i in range(31)}
    names = [tuple(r["idx_to_symbol"]) for r in every]
    assert len(set(names)) == len(names)  # drawn per question
    # node 0 (a seed) gets every name in time, not only "0"
    assert len({r["idx_to_symbol"][0] for r in every}) > 15


def test_generation_is_deterministic_by_seed_and_splits_are_disjoint(tmp_path):
    for d, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(tmp_path / d, *SMALL, "--seed", str(seed))
    for split in ("train", "valid", "test"):
        a, b, c = ((tmp_path / d / f"{split}.json").read_bytes() for d in "abc")
        assert a == b and a != c
    keys = {split: {(tuple(sorted(map(tuple, r["edges"]))), r["root"], frozenset((r["target"], r["neg_target"])))
                    for r in json.load(open(tmp_path / "a" / f"{split}.json"))} for split in ("train", "valid", "test")}
    assert [len(k) for k in keys.values()] == [60, 10, 10]  # no graph twice in a split
    assert not (keys["train"] & keys["valid"] or keys["train"] & keys["test"] or keys["valid"] & keys["test"])
    assert sorted(os.listdir(tmp_path / "a")) == ["test.json", "train.json", "valid.json"]  # no temp files left


def test_conversion_of_the_real_validation_file(tmp_path, capsys):
    if not os.path.exists(PROSQA_VALID):
        pytest.skip(f"{PROSQA_VALID} not found")
    src = json.load(open(PROSQA_VALID))
    out = run(tmp_path, "--from_dir", SHARED)
    assert list(out) == ["valid"]  # only the split that is there
    near = [r for r in src if distances(r["edges"], len(r["idx_to_symbol"]), r["root"])[r["target"]] in (3, 4)]
    assert len(out["valid"]) == len(near) == 257  # the paper's valid split
    assert "257 records (300 read, 43 not 3-4 hops" in capsys.readouterr().out
    for r, t in zip(out["valid"], near):
        check_graph(r)
        assert [r[k] for k in ("edges", "root", "target", "neg_target")] == [t[k] for k in
                                                                              ("edges", "root", "target", "neg_target")]
        # the text steps name the node each hop reaches: "Tom is a terpus." / "Every terpus is a brimpus."
        named = [t["idx_to_symbol"].index(re.fullmatch(r".* (\w+)\.", s).group(1)) for s in t["steps"]]
        assert r["steps"] == [str(i) for i in named]


def test_path_falls_back_to_a_shortest_path_when_the_steps_dont_walk_one():
    # 0 -> 2 -> 3 -> 4 -> 5 and a shortcut 0 -> 6 -> 5; the text steps take the long way
    r = dict(idx_to_symbol=["A", "B", "c", "d", "e", "f", "g"], root=0, target=5, neg_target=1,
             edges=[[0, 2], [2, 3], [3, 4], [4, 5], [0, 6], [6, 5]],
             steps=["A is a c.", "Every c is a d.", "Every d is a e.", "Every e is a f."])
    assert graph.shortest_path(r) == [6, 5]
    assert graph.shortest_path(dict(r, steps=["A is a g.", "Every g is a f."])) == [6, 5]
    assert graph.shortest_path(dict(r, target=1)) == []  # out of reach


def test_too_many_nodes_are_dropped_and_counted():
    r = prosqa.generate(1, random.Random(0), min_hops=3, max_hops=4)[0]
    big = dict(r, idx_to_symbol=r["idx_to_symbol"] + [f"x{i}" for i in range(32 - len(r["idx_to_symbol"]))])
    out, far, dropped = graph.convert([r, big], random.Random(0), permute=True)
    assert len(out) == 1 and far == 0 and dropped == 1
    with pytest.raises(ValueError, match="32 nodes"):
        graph.node_names(32, random.Random(0), permute=True)


# ----------------------------------------------------------------------------- downloads

FILES = {}  # path on the server -> bytes


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_converts_the_official_files(server, tmp_path, monkeypatch, capsys):
    text = prosqa.generate(30, random.Random(5))  # 3-6 hops, like the official files
    for i, split in enumerate(("train", "valid", "test")):
        FILES[f"/ok/prosqa_{split}.json"] = json.dumps(text[10 * i:10 * i + 10]).encode()
    monkeypatch.setenv("PROSQA_BASE_URL", f"{server}/ok")  # the default --base_url
    out = run(tmp_path)
    kept = 0
    for i, split in enumerate(("train", "valid", "test")):
        near = [r for r in text[10 * i:10 * i + 10] if len(r["steps"]) in (3, 4)]
        assert 0 < len(out[split]) == len(near)
        kept += len(near)
        for r, t in zip(out[split], near):
            check_graph(r)
            assert r["edges"] == t["edges"] and r["target"] == t["target"]
    assert kept < 30  # the 5- and 6-hop questions were left out
    assert sorted(os.listdir(tmp_path)) == ["prosqa_test.json", "prosqa_train.json", "prosqa_valid.json",
                                            "test.json", "train.json", "valid.json"]
    assert "the paper has 14785" in capsys.readouterr().out


def test_failed_download_is_one_line_that_points_at_generate(server, tmp_path, capsys):
    assert graph.main(["--base_url", f"{server}/missing", "--out_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "HTTP 404" in err and "--generate" in err and "--base_url" in err
    assert os.listdir(tmp_path) == []  # neither a .part nor a json


# ----------------------------------------------------------------------------- command lines

def test_bad_options_are_argparse_errors(tmp_path, capsys):
    for argv in (["--no_such_option"], ["--generate", "--n_train", "-1"], ["--generate", "--from_dir", str(tmp_path)],
                 ["--from_dir", str(tmp_path / "nowhere")], ["--n_test", "many"]):
        with pytest.raises(SystemExit) as e:
            graph.main([*argv, "--out_dir", str(tmp_path / "out")])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "out")


def test_the_command_line_as_documented(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "data", "prosqa_graph", "prepare.py"), *SMALL, "--out_dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3 and all(re.search(r"[\d.]+ nodes, [\d.]+ edges, 3\.\d\d hops$", line) for line in lines)
    for split in ("train", "valid", "test"):
        for r in json.load(open(tmp_path / f"{split}.json")):
            check_graph(r)
