"""data/*/prepare.py: the ProsQA and ProntoQA generators, the GSM8k-Aug conversion, downloads. Offline, fast.

Downloads are tested against a small HTTP server this file starts on 127.0.0.1.
"""
import gzip
import http.server
import json
import os
import random
import re
import threading
from collections import deque

import pytest

import data.gsm8k.prepare as gsm8k
import data.prontoqa.prepare as prontoqa
import data.prosqa.prepare as prosqa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
PROSQA_VALID = os.path.join(SHARED, "prosqa_valid.json")
GSM_VALID = os.path.join(SHARED, "gsm8k_aug_valid.txt")


def needs(path):
    if not os.path.exists(path):
        pytest.skip(f"{os.path.basename(path)} not found at {path}")
    return path


# ----------------------------------------------------------------------------- ProsQA

def reachable(children, src):
    """Shortest distances from src (written here again, independently of prepare.py)."""
    dist, queue = {src: 0}, deque([src])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def check_prosqa(r):
    """Everything a ProsQA record promises; holds for the real files too (see the test below)."""
    sym, edges, root, target, neg = r["idx_to_symbol"], r["edges"], r["root"], r["target"], r["neg_target"]
    n = len(sym)
    assert len(set(sym)) == n and root in (0, 1) and all(0 <= p < c < n for p, c in edges)
    children, parents = [[] for _ in range(n)], [[] for _ in range(n)]
    for p, c in edges:
        children[p].append(c)
        parents[c].append(p)
    # people are exactly the nodes without parents
    assert all(sym[i][0].isupper() == (not parents[i]) for i in range(n))
    mine, theirs = reachable(children, root), reachable(children, 1 - root)
    assert target in mine and target not in theirs and not children[target]
    assert neg in theirs and neg not in mine and not children[neg]

    def fact(p, c):
        return f"{sym[p]} is a {sym[c]}." if not parents[p] else f"Every {sym[p]} is a {sym[c]}."

    # the question: every edge as a fact exactly once, then the two options
    m = re.fullmatch(r"(.*) Is (\w+) a (\w+) or (\w+)\?", r["question"])
    assert m and m.group(2) == sym[root] and {m.group(3), m.group(4)} == {sym[target], sym[neg]}
    facts = [s.strip() for s in re.findall(r"[^.]+\.", m.group(1))]
    assert sorted(facts) == sorted(fact(p, c) for p, c in edges)
    # the steps: a path of real edges from root to target, as short as any
    index = {s: i for i, s in enumerate(sym)}
    path = [root]
    for step in r["steps"]:
        sm = re.fullmatch(r"(?:Every )?(\w+) is a (\w+)\.", step)
        assert sm and index[sm.group(1)] == path[-1] and [path[-1], index[sm.group(2)]] in edges
        assert step == fact(path[-1], index[sm.group(2)])
        path.append(index[sm.group(2)])
    assert path[-1] == target and len(r["steps"]) == mine[target]
    assert r["answer"] == f"{sym[root]} is a {sym[target]}."


def test_prosqa_checker_agrees_with_the_real_file():
    # the invariants above are read off the real data: they must hold there, or they test the wrong thing
    for r in json.load(open(needs(PROSQA_VALID))):
        check_prosqa(r)


@pytest.fixture(scope="module")
def prosqa_generated():
    return prosqa.generate(300, random.Random(0))


def test_prosqa_generated_records_keep_every_invariant(prosqa_generated):
    for r in prosqa_generated:
        assert set(r) == {"question", "steps", "answer", "idx_to_symbol", "edges", "root", "target", "neg_target"}
        check_prosqa(r)
    assert {r["root"] for r in prosqa_generated} == {0, 1}


def test_prosqa_statistics_are_near_the_real_ones(prosqa_generated):
    # real files: 22.8 nodes, 35.8-36.3 edges, shortest path 3.8 (3-6), 1.6 shortest paths
    s = prosqa.stats(prosqa_generated)
    assert 21 < s["nodes"] < 25 and 32 < s["edges"] < 40 and 3.5 < s["hops"] < 4.1, s
    assert s["min_hops"] == 3 and 5 <= s["max_hops"] <= 6 and 1.3 < s["paths"] < 1.9, s
    if os.path.exists(PROSQA_VALID):  # measured the same way on the real file
        real = prosqa.stats(json.load(open(PROSQA_VALID)))
        assert abs(s["nodes"] - real["nodes"]) < 1.5 and abs(s["edges"] - real["edges"]) < 3.5, (s, real)
        assert abs(s["hops"] - real["hops"]) < 0.3, (s, real)


def test_prosqa_generation_is_deterministic_by_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 1), (b, 1), (c, 2)):
        assert prosqa.main(["--generate", "--n_train", "20", "--n_valid", "3", "--n_test", "4",
                            "--seed", str(seed), "--out_dir", str(d)]) == 0
    for split, n in (("train", 20), ("valid", 3), ("test", 4)):
        ra, rb, rc = (json.load(open(d / f"{split}.json")) for d in (a, b, c))
        assert len(ra) == n and ra == rb and ra != rc
        for r in ra:
            check_prosqa(r)
    assert not [f for f in os.listdir(a) if not f.endswith(".json")]  # no temp files left


# ----------------------------------------------------------------------------- ProntoQA

def parse(sentence):
    """("Ada", "gulpus", False) for "Ada is a gulpus.", ("lompus", "sweet", True) for "Lompuses are not sweet."."""
    for pattern in (r"(?:Every|Each) (\w+) is (not )?(?:(a|an) )?(\w+)\.", r"([A-Z]\w*) is (not )?(?:(a|an) )?(\w+)\."):
        m = re.fullmatch(pattern, sentence)
        if m:
            subject, neg, art, obj = m.groups()
            assert (art is not None) == obj.endswith("pus")  # concepts ("-pus") take an article, properties don't
            assert art is None or art == ("an" if obj[0] in "aeiou" else "a")
            return subject, obj, bool(neg)
    m = re.fullmatch(r"([A-Z]\w*pus)es are (not )?(\w+)\.", sentence)
    assert m, sentence
    obj = m.group(3)[:-2] if m.group(3).endswith("puses") else m.group(3)
    return m.group(1).lower(), obj, bool(m.group(2))


def check_prontoqa(r):
    """The chain of thought proves the answer, by the rules in the context and nothing else."""
    context, query = r["question"].split(" True or false: ")
    sentences = [s.strip() for s in re.findall(r"[^.]+\.", context)]
    facts = {parse(s) for s in sentences if not s.startswith(("Every", "Each")) and " are " not in s}
    rules = {parse(s) for s in sentences} - facts
    name = next(iter(facts))[0]
    assert all(f[0] == name for f in facts) and len(facts) == 2

    # the steps: "statement. rule." five times, then the conclusion
    assert len(r["steps"]) == 6 and all(len(re.findall(r"\.", s)) == 2 for s in r["steps"][:-1])
    cot = [s.strip() for s in re.findall(r"[^.]+\.", " ".join(r["steps"]))]
    known = set(facts)
    for i in range(0, len(cot) - 1, 2):
        stmt, rule, conclusion = parse(cot[i]), parse(cot[i + 1]), parse(cot[i + 2])
        assert stmt in known and not stmt[2]           # something already shown: "name is a X"
        assert rule in rules and rule[0] == stmt[1]    # a rule of the context about X
        assert conclusion == (name, rule[1], rule[2])  # modus ponens
        known.add(conclusion)
    q = parse(query)
    assert q[:2] == conclusion[:2]
    assert r["answer"] == ("True" if q == conclusion else "False")

    # and the context as a whole says nothing else about it: forward chaining reaches no contradiction
    closure, frontier = set(facts), list(facts)
    while frontier:
        _, x, neg = frontier.pop()
        for subject, obj, rneg in rules:
            if subject == x and not neg and (name, obj, rneg) not in closure:
                closure.add((name, obj, rneg))
                frontier.append((name, obj, rneg))
    assert not any((name, obj, not neg) in closure for _, obj, neg in closure)
    assert (name, q[1], not q[2]) in closure if r["answer"] == "False" else q in closure


def test_prontoqa_splits_are_sized_proved_and_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 3), (b, 3), (c, 4)):
        assert prontoqa.main(["--n_train", "40", "--n_valid", "5", "--n_test", "8", "--seed", str(seed),
                              "--out_dir", str(d)]) == 0
    answers = []
    for split, n in (("train", 40), ("valid", 5), ("test", 8)):
        ra, rb, rc = (json.load(open(d / f"{split}.json")) for d in (a, b, c))
        assert len(ra) == n and ra == rb and ra != rc
        for r in ra:
            assert set(r) == {"question", "steps", "answer"}
            check_prontoqa(r)
            answers.append(r["answer"])
    assert {"True", "False"} == set(answers)


def test_the_checkers_catch_broken_records():
    r = prontoqa.make_example(random.Random(0))
    check_prontoqa(r)
    other_rule = r["steps"][2].split(". ")[1]
    for bad in (dict(r, answer="False" if r["answer"] == "True" else "True"),  # wrong answer
                dict(r, steps=r["steps"][:2] + r["steps"][3:]),                 # a hop left out
                dict(r, steps=[r["steps"][0].split(". ")[0] + ". " + other_rule] + r["steps"][1:])):  # wrong rule
        with pytest.raises(AssertionError):
            check_prontoqa(bad)
    r = prosqa.generate(1, random.Random(0))[0]
    check_prosqa(r)
    sym = r["idx_to_symbol"]
    for bad in (dict(r, answer=f"{sym[r['root']]} is a {sym[r['neg_target']]}."),  # names the wrong option
                dict(r, steps=r["steps"][:-1]),                                     # stops short
                dict(r, target=r["neg_target"], neg_target=r["target"])):           # options swapped
        with pytest.raises(AssertionError):
            check_prosqa(bad)


def test_prontoqa_defaults_are_the_papers_10000_examples(tmp_path):
    assert prontoqa.main(["--out_dir", str(tmp_path)]) == 0
    for split, n in (("train", 9000), ("valid", 200), ("test", 800)):
        records = json.load(open(tmp_path / f"{split}.json"))
        assert len(records) == n
        for r in records[::50]:
            check_prontoqa(r)


# ----------------------------------------------------------------------------- GSM8k-Aug

def official_rule(line):
    """The conversion, re-derived independently: partition/rfind rather than split."""
    question, _, rest = line.partition("||")
    between = rest.partition("||")[0]
    steps = between.partition("##")[0].strip().split(" ")
    answer = line[line.rfind("##") + 2:] if "##" in line else line
    return {"question": question, "steps": steps, "answer": answer.strip()}


def test_gsm8k_conversion_of_the_real_validation_file():
    with open(needs(GSM_VALID), encoding="utf-8") as f:
        lines = f.readlines()
    records = gsm8k.convert_lines(gsm8k.read_lines(GSM_VALID))
    assert len(records) == 500 and records == [official_rule(line) for line in lines]
    assert records[0] == {
        "question": "John cuts his grass to 2 inches.  It grows .5 inches per month.  When it gets to 4 inches "
                    "he cuts it back down to 2 inches.  It cost $100 to get his grass cut.  How much does he pay "
                    "per year?",
        "steps": ["<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>"], "answer": "300"}


def test_gsm8k_conversion_keeps_the_official_quirks():
    # the question is not stripped; a double space makes an empty step; the answer is after the LAST "##"
    lines = ["How many? ||<<1+1=2>>  <<2*2=4>> #### 4\n", "Q||<<5-1=4>> ## x ## 1,000\n", "Q2|| #### 7"]
    assert gsm8k.convert_lines(lines) == [
        {"question": "How many? ", "steps": ["<<1+1=2>>", "", "<<2*2=4>>"], "answer": "4"},
        {"question": "Q", "steps": ["<<5-1=4>>"], "answer": "1,000"},
        {"question": "Q2", "steps": [""], "answer": "7"}]
    assert gsm8k.convert_lines(lines) == [official_rule(line) for line in lines]
    with pytest.raises(ValueError, match="line 2 has no '||'"):
        gsm8k.convert_lines(["a||b ## 1\n", "no separator here\n"])


# ----------------------------------------------------------------------------- downloads

FILES = {}  # path on the server -> bytes


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.path.startswith("/gzip/"):  # a server that compresses even when asked not to
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        # under /cut/ the server promises more than it sends, then closes: a connection dropped mid-file
        self.send_header("Content-Length", str(len(body) + (1000 if self.path.startswith("/cut/") else 0)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def serve(prefix, name, body):
    FILES[f"/{prefix}/{name}"] = body if isinstance(body, bytes) else body.encode()


def test_prosqa_download_writes_the_three_files(server, tmp_path, capsys):
    records = prosqa.generate(9, random.Random(5))
    for i, split in enumerate(("train", "valid", "test")):
        serve("ok", f"prosqa_{split}.json", json.dumps(records[3 * i:3 * i + 3]))
    assert prosqa.main(["--base_url", f"{server}/ok", "--out_dir", str(tmp_path)]) == 0
    for i, split in enumerate(("train", "valid", "test")):
        assert json.load(open(tmp_path / f"{split}.json")) == records[3 * i:3 * i + 3]
    assert sorted(os.listdir(tmp_path)) == ["prosqa_test.json", "prosqa_train.json", "prosqa_valid.json",
                                            "test.json", "train.json", "valid.json"]
    assert "shortest path" in capsys.readouterr().out


def test_gzipped_download_is_counted_on_the_wire_and_saved_decoded(server, tmp_path):
    from data.common import download
    body = json.dumps(prosqa.generate(20, random.Random(4))).encode()
    serve("gzip", "x.json", body)
    download(f"{server}/gzip/x.json", str(tmp_path / "x.json"))
    assert (tmp_path / "x.json").read_bytes() == body


def test_prosqa_download_replaces_generated_files(server, tmp_path):
    # a generated set in out_dir must not pass for the official one
    prosqa.main(["--generate", "--n_train", "2", "--n_valid", "2", "--n_test", "2", "--out_dir", str(tmp_path)])
    records = prosqa.generate(3, random.Random(8))
    for split in ("train", "valid", "test"):
        serve("ok2", f"prosqa_{split}.json", json.dumps(records))
    assert prosqa.main(["--base_url", f"{server}/ok2", "--out_dir", str(tmp_path)]) == 0
    for split in ("train", "valid", "test"):
        assert json.load(open(tmp_path / f"{split}.json")) == records


def test_prosqa_impossible_generation_settings_are_a_clean_error(tmp_path):
    with pytest.raises(SystemExit, match="no valid question in"):
        prosqa.main(["--generate", "--n_nodes", "6", "--min_hops", "30", "--max_hops", "30",
                     "--out_dir", str(tmp_path)])


def test_prosqa_download_404_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    with pytest.raises(SystemExit, match=r"HTTP 404") as e:
        prosqa.main(["--base_url", f"{server}/missing", "--out_dir", str(tmp_path)])
    assert "--generate" in str(e.value) and "--base_url" in str(e.value)  # how to get past it offline
    assert os.listdir(tmp_path) == []


def test_download_cut_short_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    serve("cut", "prosqa_train.json", json.dumps(prosqa.generate(3, random.Random(6))))
    with pytest.raises(SystemExit) as e:
        prosqa.main(["--base_url", f"{server}/cut", "--out_dir", str(tmp_path)])
    assert "prosqa_train.json" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # neither train.json nor train.json.part


def test_prosqa_download_that_is_not_prosqa_is_removed(server, tmp_path):
    serve("bad", "prosqa_train.json", "<html>rate limited</html>")
    with pytest.raises(SystemExit, match="not valid JSON"):
        prosqa.main(["--base_url", f"{server}/bad", "--out_dir", str(tmp_path)])
    serve("bad2", "prosqa_train.json", json.dumps([{"question": "q", "steps": [], "answer": "a"}]))
    with pytest.raises(SystemExit, match="not a JSON list of ProsQA records"):
        prosqa.main(["--base_url", f"{server}/bad2", "--out_dir", str(tmp_path)])
    assert os.listdir(tmp_path) == []


def test_gsm8k_download_and_conversion(server, tmp_path):
    train = "A?||<<1+2=3>> #### 3\nB?||<<2*3=6>> <<6+1=7>> #### 7\n"
    serve("lfs", "train.txt", train)
    serve("raw", "valid.txt", "C?||<<9-4=5>> #### 5\n")
    serve("raw", "test.txt", "D? ||<<8/2=4>> #### 4")  # no final newline
    assert gsm8k.main(["--lfs_url", f"{server}/lfs", "--raw_url", f"{server}/raw", "--out_dir", str(tmp_path)]) == 0
    assert json.load(open(tmp_path / "train.json")) == [
        {"question": "A?", "steps": ["<<1+2=3>>"], "answer": "3"},
        {"question": "B?", "steps": ["<<2*3=6>>", "<<6+1=7>>"], "answer": "7"}]
    assert json.load(open(tmp_path / "test.json")) == [{"question": "D? ", "steps": ["<<8/2=4>>"], "answer": "4"}]
    assert sorted(os.listdir(tmp_path)) == ["test.json", "test.txt", "train.json", "train.txt", "valid.json",
                                            "valid.txt"]


def test_gsm8k_download_errors(server, tmp_path):
    with pytest.raises(SystemExit, match="train.txt failed: HTTP 404"):
        gsm8k.main(["--lfs_url", f"{server}/nothing", "--raw_url", f"{server}/raw", "--out_dir", str(tmp_path)])
    assert os.listdir(tmp_path) == []
    serve("cut", "train.txt", "A?||<<1+2=3>> #### 3\n" * 50)
    with pytest.raises(SystemExit, match="incomplete|failed"):
        gsm8k.main(["--lfs_url", f"{server}/cut", "--raw_url", f"{server}/raw", "--out_dir", str(tmp_path)])
    assert os.listdir(tmp_path) == []
    serve("notgsm", "train.txt", "just some text\n")
    with pytest.raises(SystemExit, match="no '||'"):
        gsm8k.main(["--lfs_url", f"{server}/notgsm", "--raw_url", f"{server}/raw", "--out_dir", str(tmp_path)])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- command lines

@pytest.mark.parametrize("module", [prosqa, prontoqa, gsm8k])
def test_bad_output_dir_and_unknown_option_are_clean_errors(module, tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("")
    for argv in (["--out_dir", str(a_file)], ["--out_dir", str(a_file / "sub")], ["--no_such_option"]):
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("prepare.py: error:") or "error:" in err[-1], err
    assert a_file.read_text() == ""


def test_progress_is_plain_lines_in_a_log(capsys, monkeypatch):
    # stderr to a file or a pipe (a log): one line per update, no carriage return to run them together
    from data.common import progress, progress_done
    progress("train: 1000/3000")
    progress("train: 2000/3000")
    progress_done()
    assert capsys.readouterr().err == "train: 1000/3000\ntrain: 2000/3000\n"
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)  # a terminal: rewritten in place, ended once
    progress("a")
    progress("b")
    progress_done()
    assert capsys.readouterr().err == "\ra\rb\n"
