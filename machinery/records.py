"""
The records: a data set file in, token ids out.

A record is {"question": str, "steps": [str, ...], "answer": str}. It is tokenized in pieces,

    question = encode(question + "\n"),  step i = encode(step_i + "\n"),  answer = encode("### " + answer) + [eos]

(a Tokenized), which the curriculum (curriculum.py) then shapes into a different training sequence at
every stage. check_length guards the model's block_size.
"""
import json
import os
from collections import deque
from typing import List, NamedTuple, Optional

from machinery.tokenizer import _texts, gpt2_tokenizer


EXPECTED = 'a JSON list of {"question", "steps", "answer"} records, or JSON Lines (one record per line)'


def load_records(path, steps_optional=False):
    """
    A data set file: a JSON list of {"question": str, "steps": [str, ...], "answer": str}, or JSON Lines (one
    such object per line: a .jsonl file, or any file whose JSON stops after its first line), checked.
    steps_optional: a record without "steps" gets [] (questions to answer, as sample.py --file takes them).
    ValueError, one line naming the file, the line and what is expected, for anything else.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (expected {EXPECTED})")
    lines = path.endswith(".jsonl")
    try:
        data = json_lines(text) if lines else json.loads(text)
    except json.JSONDecodeError as e:
        if not lines and e.msg == "Extra data":  # a second JSON value after the first: JSON Lines
            try:
                data = json_lines(text)
            except json.JSONDecodeError as e2:
                raise ValueError(f"{path}: not valid JSON or JSON Lines: {where(e2)} (expected {EXPECTED})") from None
        else:
            raise ValueError(f"{path}: not valid JSON{' Lines' * lines}: {where(e)} (expected {EXPECTED})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected {EXPECTED}, got a JSON {type(data).__name__}")
    for i, r in enumerate(data):
        if steps_optional and isinstance(r, dict):
            r.setdefault("steps", [])
        _check_record(r, f"{path}: record {i}")
    return data


def json_lines(text):
    """JSON Lines: one JSON value per non-blank line -> the list of them (json.JSONDecodeError at the first bad
    line, its lineno that of the file)."""
    data = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise json.JSONDecodeError(e.msg, text, sum(len(l) + 1 for l in text.splitlines()[:n - 1]) + e.pos)
    return data


def where(e):
    # some messages end in "at" already ("Invalid control character at")
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} line {e.lineno} column {e.colno}"


def load_split(data_dir, dataset, split):
    """<data_dir>/<dataset>/<split>.json (or .jsonl): a prepared data set of this project, or any folder of the
    user's."""
    path = os.path.join(data_dir, dataset, f"{split}.json")
    if not os.path.isfile(path) and os.path.isfile(path + "l"):
        path += "l"
    if not os.path.isfile(path):
        home = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", dataset)
        ours = os.path.isfile(os.path.join(home, "prepare.py"))
        # the script writes beside itself unless told where: the command must make the file where it is looked for
        there = "" if os.path.realpath(os.path.join(data_dir, dataset)) == os.path.realpath(home) else \
            f" --out_dir {os.path.join(data_dir, dataset)}"
        how = (f"make it with `python data/{dataset}/prepare.py{there}`" if ours else
               'put a JSON list of {"question", "steps", "answer"} records there')
        raise FileNotFoundError(f"{path} not found: {how}")
    records = load_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _check_record(r, where):
    if not isinstance(r, dict):
        raise ValueError(f"{where}: expected an object with question/steps/answer, got {type(r).__name__}")
    for key in ("question", "steps", "answer"):
        if key not in r:
            raise ValueError(f"{where}: missing field '{key}'")
    for key in ("question", "answer"):
        if not isinstance(r[key], str):
            raise ValueError(f"{where}: field '{key}' should be a string, got {type(r[key]).__name__}")
    if not isinstance(r["steps"], list):
        raise ValueError(f"{where}: field 'steps' should be a list of strings, got {type(r['steps']).__name__}")
    for j, s in enumerate(r["steps"]):
        if not isinstance(s, str):
            raise ValueError(f"{where}: field 'steps' item {j} should be a string, got {type(s).__name__}")
    if not r["question"].strip():
        raise ValueError(f"{where}: field 'question' is empty")


class Tokenized(NamedTuple):
    question: List[int]     # encode(question + "\n"), after <|begin_of_text|> for Llama
    steps: List[List[int]]  # encode(step + "\n") for each step
    answer: List[int]       # encode("### " + answer) + [eos]
    hops: Optional[List[List[List[int]]]] = None  # graph records: hops[k-1] = encode(name) of each node k hops
                                                  # from the root on a shortest path to the target (frontier mode)
    from_root: Optional[List[List[int]]] = None  # graph records: from_root[k] = the first tokens of the nodes
                                                 # exactly k edges from the root, sorted and distinct: the set
                                                 # label of thought k (--thought_labels frontier), made once here


def graph_question(record, rng=None):
    """
    The symbolic ProsQA question of "Reasoning by Superposition" (data/prosqa_graph), from a record's
    graph fields: every edge as "parent child", joined by " | ", then "[Q]" and the two options,
    then "[R]" and the root, all in node names (idx_to_symbol):  "3 7 | 0 2 | ... [Q] 16 13 [R] 1".
    With rng (a random.Random), the edges and the two options are shuffled first: the recipe reshuffles
    them every epoch, so that no position in the question gives an answer away.
    """
    names, edges = record["idx_to_symbol"], list(record["edges"])
    options = [record["target"], record["neg_target"]]
    if rng is not None:
        rng.shuffle(edges)
        rng.shuffle(options)
    return (" | ".join(f"{names[a]} {names[b]}" for a, b in edges) +
            f" [Q] {names[options[0]]} {names[options[1]]} [R] {names[record['root']]}")


def tokenize(record, tok=None):
    tok = tok or gpt2_tokenizer()
    q, *steps, a = (tok.encode(t) for t in _texts(record))
    hops = from_root = None
    if all(k in record for k in ("idx_to_symbol", "edges", "root", "target")):
        hops = [[tok.encode(record["idx_to_symbol"][v]) for v in layer] for layer in shortest_path_layers(record)]
    if all(k in record for k in ("idx_to_symbol", "edges", "root")):
        names = [[tok.encode(record["idx_to_symbol"][v]) for v in ring] for ring in rings_from_root(record)]
        from_root = [sorted({ids[0] for ids in ring if ids}) for ring in names]
    bos = [] if tok.bos_id is None else [tok.bos_id]  # Llama's <|begin_of_text|>
    return Tokenized(bos + q, steps, a + [tok.eos_id], hops, from_root)


def bfs(adjacent, sources, n):
    """Shortest number of hops from any source along `adjacent` (lists of neighbours); None where never reached."""
    dist = [None] * n
    queue = deque(sources)
    for s in sources:
        dist[s] = 0
    while queue:
        u = queue.popleft()
        for v in adjacent[u]:
            if dist[v] is None:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def shortest_path_layers(record):
    """
    The nodes on shortest root-to-target paths, by hop: [[nodes 1 hop from the root], ..., [the target]]
    ([] if the target is unreachable). These are the labels of the frontier curriculum ("Reasoning by
    Superposition": the authors' neighbor_k), and the "optimal" group of its analysis.
    """
    n = len(record["idx_to_symbol"])
    down, up = [[] for _ in range(n)], [[] for _ in range(n)]
    for a, b in record["edges"]:
        down[a].append(b)
        up[b].append(a)
    from_root, to_target = bfs(down, [record["root"]], n), bfs(up, [record["target"]], n)
    d = from_root[record["target"]]
    if d is None:
        return []
    layers = [[] for _ in range(d)]
    for v in range(n):  # on a shortest path: as far from the root as from the target is short of d
        k = from_root[v]
        if k and to_target[v] is not None and k + to_target[v] == d:
            layers[k - 1].append(v)
    return layers


def rings_from_root(record):
    """
    The nodes the edges reach from the root, by distance: [[root], [nodes 1 edge away], [2 edges away], ...]
    (shortest distances, in idx_to_symbol order within a ring). Ring k is what a breadth-first search holds
    after k steps: the set label of thought k under --thought_labels frontier (Zhu et al. 2025, "Emergence of
    Superposition", arXiv 2509.23365, Appendix E.2). On data/reach it is one node on each of the start's branches.
    """
    n = len(record["idx_to_symbol"])
    down = [[] for _ in range(n)]
    for a, b in record["edges"]:
        down[a].append(b)
    dist = bfs(down, [record["root"]], n)
    rings = [[] for _ in range(1 + max(d for d in dist if d is not None))]
    for v, d in enumerate(dist):
        if d is not None:
            rings[d].append(v)
    return rings


def check_length(examples, block_size, skip_long=False):
    """
    The indices of the examples (dicts with input_ids, or id lists) that fit in block_size. A longer
    one is an error unless skip_long, which drops it and prints how many were dropped.
    (collate's left padding can still make a batch wider than its longest example.)
    """
    keep = []
    for i, e in enumerate(examples):
        n = len(e["input_ids"] if isinstance(e, dict) else e)
        if n <= block_size:
            keep.append(i)
        elif not skip_long:
            raise ValueError(f"example {i} is {n} tokens long, longer than block_size {block_size} "
                             f"(train.py --skip_long drops such examples)")
    if len(keep) < len(examples):
        print(f"skipped {len(examples) - len(keep)} of {len(examples)} examples longer than block_size {block_size}")
    return keep
