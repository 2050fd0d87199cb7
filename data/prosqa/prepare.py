"""
ProsQA: data/prosqa/{train,valid,test}.json.

By default the official files (17,886 / 300 / 500 records) are downloaded from the authors' repository.
With --generate a fresh set is grown here instead, following the paper's Algorithm 1, in the same format:

    question  Every lompus is a drempus. Hana is a gulpus. Every gulpus is a lompus. ... Is Hana a drempus or tarpus?
    steps     Hana is a gulpus. / Every gulpus is a lompus. / Every lompus is a drempus.
    answer    Hana is a drempus.
    graph     idx_to_symbol (node i's name), edges ([p, c] pairs), root (the node asked about, 0 or 1),
              target (the right option), neg_target (the wrong one)

An edge [p, c] reads "p is a c": "Hana is a gulpus." when p is a person (a node without parents), "Every
gulpus is a lompus." otherwise. The question lists every edge once, shuffled; the steps are one shortest
path from root to target. The target is a leaf only root reaches, neg_target a leaf only the other seed
reaches, so the answer follows from the facts and nothing else.

    python data/prosqa/prepare.py                          # download the official files (kept as prosqa_*.json)
    python data/prosqa/prepare.py --generate --seed 1      # 17,886 / 300 / 500 generated records
    python data/prosqa/prepare.py --generate --n_train 2000 --out_dir /tmp/prosqa
"""
import json
import math
import os
import random
import shutil
import sys
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from machinery.argparser import Parser  # noqa: E402
from data.common import download, make_out_dir, progress, progress_done, save_json  # noqa: E402

BASE_URL = "https://raw.githubusercontent.com/facebookresearch/coconut/main/data"
SPLITS = {"train": 17886, "valid": 300, "test": 500}  # the official sizes

# Our own names; the real data uses 17 people and 38 concepts, so we do too. All concepts start with a
# consonant because ProsQA always writes "a <concept>".
PERSONS = ["Ada", "Ben", "Cleo", "Dan", "Eli", "Finn", "Gus", "Hana", "Ivy", "June", "Kai", "Leo", "Mia",
           "Nora", "Otto", "Pia", "Ruth"]
CONCEPTS = ["blorpus", "dimpus", "drempus", "frompus", "glimpus", "gulpus", "harpus", "jarpus", "kimpus",
            "klompus", "lompus", "marpus", "mimpus", "nerpus", "norpus", "pempus", "plimpus", "porpus",
            "quorpus", "ralpus", "rimpus", "sarpus", "shimpus", "skorpus", "slumpus", "sompus", "tarpus",
            "thimpus", "trompus", "valpus", "vimpus", "welpus", "wimpus", "xorpus", "yalpus", "zarpus",
            "zempus", "zilpus"]


# -----------------------------------------------------------------------------
# growing one graph (Algorithm 1)

def poisson(rng, lam):
    """Knuth's method: count uniforms until their product drops below exp(-lam)."""
    k, p, limit = 0, rng.random(), math.exp(-lam)
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def grow_dag(rng, n_nodes, lam=1.5):
    """Parents of nodes 0..n_nodes-1; nodes 0 and 1 are the two seeds, every parent precedes its child.

    label[i] says from which seed node i can be reached (bit 1: node 0, bit 2: node 1, 0: neither, i.e.
    it descends only from a later root). A new node's parents come, with probability 0.35 each, only from
    node 0's side (reached from node 0, not from node 1), or only from node 1's side, else from any node:
    this keeps the two seeds' descendants largely apart, so that each side has leaves of its own. Deeper
    candidates are preferred (weight 1.5*depth+1), which makes long chains, hence multi-hop questions.
    A node that draws no parents is a new root (a person). Taking the one-sided candidates as "reached
    from this seed only" rather than "not reached from the other seed" (which would add the later roots'
    descendants) is what reproduces the real files' statistics: about 2.6 roots a graph, not 4.5.
    """
    parents, label, depth = [[], []], [1, 2], [0, 0]
    for i in range(2, n_nodes):
        u = rng.random()
        if u < 0.35:
            cands = [j for j in range(i) if label[j] == 1]
        elif u < 0.7:
            cands = [j for j in range(i) if label[j] == 2]
        else:
            cands = list(range(i))
        k = min(poisson(rng, lam), len(cands))
        weights = [1.5 * depth[j] + 1 for j in cands]
        chosen = []
        for _ in range(k):  # weighted sampling without replacement
            j = rng.choices(range(len(cands)), weights)[0]
            chosen.append(cands.pop(j))
            weights.pop(j)
        parents.append(chosen)
        label.append(0)
        for p in chosen:
            label[i] |= label[p]  # reachable from a seed iff some parent is
        depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
    return parents


def drop_isolated(parents):
    """Remove nodes with neither parents nor children (roots nobody chose); renumber keeping the order."""
    has_child = {p for ps in parents for p in ps}
    keep = [i for i, ps in enumerate(parents) if ps or i in has_child]
    new = {old: k for k, old in enumerate(keep)}
    return [[new[p] for p in parents[i]] for i in keep]


def bfs(children, src):
    """Shortest distance (in edges) from src to every node it reaches."""
    dist, queue = {src: 0}, deque([src])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def make_record(rng, n_nodes, min_hops, max_hops):
    """One ProsQA question, or None if this graph doesn't make a valid one (the caller retries)."""
    grown = grow_dag(rng, n_nodes)
    if not any(0 in ps for ps in grown) or not any(1 in ps for ps in grown):
        return None  # a seed without descendants: no question on this graph
    parents = drop_isolated(grown)  # the seeds are kept, so they stay nodes 0 and 1
    n = len(parents)
    children = [[] for _ in range(n)]
    for c, ps in enumerate(parents):
        for p in ps:
            children[p].append(c)
    roots = [i for i in range(n) if not parents[i]]
    if len(roots) > len(PERSONS) or n - len(roots) > len(CONCEPTS):
        return None
    dist = [bfs(children, 0), bfs(children, 1)]
    # each seed's own leaves: concepts with no children that only this seed reaches
    own = [[i for i in range(n) if not children[i] and parents[i] and i in dist[s] and i not in dist[1 - s]]
           for s in (0, 1)]
    if not own[0] or not own[1]:
        return None
    # ask about the seed whose own leaves lie deeper, the target being one of its deepest: in all 800 real
    # valid and test records the target is a deepest own leaf of root, and no deeper than the other's
    far = [max(dist[s][i] for i in own[s]) for s in (0, 1)]
    root = rng.choice((0, 1)) if far[0] == far[1] else int(far[1] > far[0])
    hops = far[root]
    if not min_hops <= hops <= max_hops:
        return None
    target = rng.choice([i for i in own[root] if dist[root][i] == hops])
    neg_target = rng.choice(own[1 - root])

    persons = iter(rng.sample(PERSONS, len(roots)))
    concepts = iter(rng.sample(CONCEPTS, n - len(roots)))
    symbols = [next(concepts) if parents[i] else next(persons) for i in range(n)]
    edges = [[p, c] for c in range(n) for p in parents[c]]

    def fact(p, c):
        return f"{symbols[p]} is a {symbols[c]}." if not parents[p] else f"Every {symbols[p]} is a {symbols[c]}."

    # one shortest path, walked back from the target through a random parent one step closer to the root
    path = [target]
    while path[-1] != root:
        path.append(rng.choice([p for p in parents[path[-1]] if dist[root].get(p) == dist[root][path[-1]] - 1]))
    path.reverse()
    facts = [fact(p, c) for p, c in edges]
    rng.shuffle(facts)
    options = [symbols[target], symbols[neg_target]]
    rng.shuffle(options)
    return dict(question=" ".join(facts) + f" Is {symbols[root]} a {options[0]} or {options[1]}?",
                steps=[fact(p, c) for p, c in zip(path, path[1:])],
                answer=f"{symbols[root]} is a {symbols[target]}.",
                idx_to_symbol=symbols, edges=edges, root=root, target=target, neg_target=neg_target)


def generate(n, rng, n_nodes=28, min_hops=3, max_hops=6, max_tries=10000):
    records, misses = [], 0
    while len(records) < n:
        r = make_record(rng, n_nodes, min_hops, max_hops)
        if r is not None:
            records.append(r)
            misses = 0
            continue
        misses += 1
        if misses == max_tries:  # most graphs make a question: this is a bad setting
            raise RuntimeError(f"no valid question in {max_tries} graphs of {n_nodes} nodes with "
                               f"{min_hops}-{max_hops} hops: lower --min_hops or raise --n_nodes")
    return records


# -----------------------------------------------------------------------------
# statistics, the same for downloaded and generated files

def stats(records):
    """Mean nodes, edges, shortest root->target distance (and its range), shortest paths per question."""
    nodes = edges = hops = n_paths = 0
    lo, hi = math.inf, 0
    for r in records:
        n = len(r["idx_to_symbol"])
        children = [[] for _ in range(n)]
        for p, c in r["edges"]:
            children[p].append(c)
        dist = bfs(children, r["root"])
        count = [0] * n  # number of shortest paths from root, in order of distance
        count[r["root"]] = 1
        for u in sorted(dist, key=dist.get):
            for v in children[u]:
                if dist[v] == dist[u] + 1:
                    count[v] += count[u]
        d = dist[r["target"]]
        nodes, edges, hops, n_paths = nodes + n, edges + len(r["edges"]), hops + d, n_paths + count[r["target"]]
        lo, hi = min(lo, d), max(hi, d)
    k = max(len(records), 1)
    return dict(nodes=nodes / k, edges=edges / k, hops=hops / k, min_hops=lo, max_hops=hi, paths=n_paths / k)


def format_stats(s):
    return (f"nodes {s['nodes']:.1f}, edges {s['edges']:.1f}, shortest path {s['hops']:.2f} "
            f"({s['min_hops']}-{s['max_hops']}), shortest paths per question {s['paths']:.2f}")


# -----------------------------------------------------------------------------
# writing and downloading

def check_records(path):
    """Load path and make sure it's a JSON list of ProsQA records (text and graph); returns the list."""
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{path} is not valid JSON: {e}") from None

    def ok(r):
        return (isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
                and isinstance(r.get("steps"), list) and all(isinstance(s, str) for s in r["steps"])
                and isinstance(r.get("idx_to_symbol"), list) and isinstance(r.get("edges"), list)
                and all(isinstance(r.get(k), int) for k in ("root", "target", "neg_target")))
    if not isinstance(records, list) or not all(ok(r) for r in records):
        raise RuntimeError(f"{path} is not a JSON list of ProsQA records (question, steps, answer and the graph)")
    return records


def fetch(base_url, out_dir):
    for split, expected in SPLITS.items():
        # the file as published is kept under its own name, so a rerun downloads nothing, and a generated
        # train.json lying in out_dir can't be mistaken for it
        cache = os.path.join(out_dir, f"prosqa_{split}.json")
        download(f"{base_url.rstrip('/')}/prosqa_{split}.json", cache)
        try:
            records = check_records(cache)
        except RuntimeError:
            os.remove(cache)  # don't leave a bad file that the next run would trust
            raise
        path = os.path.join(out_dir, f"{split}.json")
        shutil.copyfile(cache, path + ".tmp")
        os.replace(path + ".tmp", path)
        note = "" if len(records) == expected else f" (the official file has {expected})"
        print(f"{path}: {len(records)} records{note}; {format_stats(stats(records))}")


def main(argv=None):
    p = Parser(prog="data/prosqa/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--base_url", default=os.environ.get("PROSQA_BASE_URL", BASE_URL),
                   help="where prosqa_{train,valid,test}.json are (env PROSQA_BASE_URL)")
    p.add_argument("--generate", action="store_true", help="grow a new data set instead of downloading")
    p.add_argument("--n_train", type=int, default=SPLITS["train"])
    p.add_argument("--n_valid", type=int, default=SPLITS["valid"])
    p.add_argument("--n_test", type=int, default=SPLITS["test"])
    p.add_argument("--n_nodes", type=int, default=28,
                   help="nodes grown per graph before the isolated ones are dropped (28 gives ~23 like the real data)")
    p.add_argument("--min_hops", type=int, default=3)
    p.add_argument("--max_hops", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.n_train, args.n_valid, args.n_test) < 0:
        p.error("--n_train, --n_valid and --n_test must not be negative")
    if not 6 <= args.n_nodes <= len(CONCEPTS) + 2:
        p.error(f"--n_nodes must be between 6 and {len(CONCEPTS) + 2}")
    if not 1 <= args.min_hops <= args.max_hops:
        p.error("need 1 <= --min_hops <= --max_hops")
    make_out_dir(p, args.out_dir)

    if not args.generate:
        try:
            fetch(args.base_url, args.out_dir)
        except RuntimeError as e:
            sys.exit(f"error: {e} (offline? --generate makes ProsQA here with the paper's Algorithm 1; "
                     f"--base_url points at a mirror)")
        return 0

    rng = random.Random(args.seed)
    every = []
    for split in ("train", "valid", "test"):
        n = getattr(args, f"n_{split}")
        records = []
        while len(records) < n:  # in chunks, so a long run shows progress
            try:
                records += generate(min(1000, n - len(records)), rng, args.n_nodes, args.min_hops, args.max_hops)
            except RuntimeError as e:
                sys.exit(f"error: {e}")
            if n > 1000:
                progress(f"{split}: {len(records)}/{n}")
        progress_done()
        path = os.path.join(args.out_dir, f"{split}.json")
        save_json(records, path)
        every += records
        print(f"{path}: {len(records)} records")
    print(f"generated: {format_stats(stats(every))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
