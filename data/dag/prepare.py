"""
DAG: per-question graph search, small enough to learn on a CPU: data/dag/{train,valid,test}.json, the CPU demo's
data (python train.py --demo). Nothing to download; every question is a fresh graph with fresh names.

Each question holds two layered DAGs with no edge between them. The root's: the root, then --depth layers of
--width nodes, every node with 1 to --parents parents in the layer above. The other DAG has the same shape
and a root of its own that the question never names. The options are a node of the last layer of each DAG,
so both have --depth-hop ancestor chains and the answer is the one whose chain reaches the root:

    question  k c | q w | a k | m q | ... [Q] x b [R] a     every edge "parent child", the options, the root
    steps     k / c / b                                     one shortest path from the root, a node a hop
    answer    b
    graph     idx_to_symbol, edges, root, target, neg_target, as in ProsQA

Node names are drawn per question from --symbols letters, so nothing can be learned by heart: the model must
look the edges up in its context. Answering takes --depth lookups in a row. A 2-layer transformer does about
one lookup per forward pass (layer 1 tells each child token its parent, layer 2 gathers the children of
the nodes it holds), so it cannot answer in one pass (No-CoT), and a chain of thought must pick one branch
before it can see where the branches lead. Continuous thoughts can hold the whole frontier at once.

    python data/dag/prepare.py                                   # 30,000 / 500 / 500 graphs, depth 3
    python data/dag/prepare.py --depth 4 --width 2 3 --n_train 50000
"""
import os
import random
import string
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from machinery.argparser import Parser  # noqa: E402
from data.common import distinct_records, make_out_dir, save_json  # noqa: E402

SPLITS = ("train", "valid", "test")


def layered_dag(rng, first, depth, width, max_parents):
    """Node ids first, first+1, ...: a root, then depth layers of width[0]..width[1] nodes, each node with
    1..max_parents parents drawn from the layer above. Returns (layers, edges)."""
    layers, edges, n = [[first]], [], first + 1
    for _ in range(depth):
        layer = list(range(n, n + rng.randint(*width)))
        n += len(layer)
        above = layers[-1]
        for child in layer:
            for parent in rng.sample(above, rng.randint(1, min(max_parents, len(above)))):
                edges.append([parent, child])
        layers.append(layer)
    return layers, edges


def make_record(rng, depth=3, width=(2, 3), max_parents=2, symbols=string.ascii_lowercase[:24]):
    """One question: the root's DAG, a disconnected one of the same shape, their last layers' nodes as options."""
    mine, edges = layered_dag(rng, 0, depth, width, max_parents)
    other, edges2 = layered_dag(rng, sum(map(len, mine)), depth, width, max_parents)
    n = sum(map(len, mine)) + sum(map(len, other))
    if n > len(symbols):
        raise ValueError(f"a graph of {n} nodes but only {len(symbols)} symbols: raise --symbols or lower --width")
    names = rng.sample(list(symbols), n)
    edges = edges + edges2
    rng.shuffle(edges)
    target, neg = rng.choice(mine[-1]), rng.choice(other[-1])
    path = [target]  # walk back through random parents: each layer is one hop, so any such walk is shortest
    while path[-1] != 0:
        path.append(rng.choice([p for p, c in edges if c == path[-1]]))
    path = path[::-1][1:]
    options = [target, neg]
    rng.shuffle(options)
    question = (" | ".join(f"{names[a]} {names[b]}" for a, b in edges) +
                f" [Q] {names[options[0]]} {names[options[1]]} [R] {names[0]}")
    return dict(question=question, steps=[names[i] for i in path], answer=names[target], idx_to_symbol=names,
                edges=edges, root=0, target=target, neg_target=neg)


def main(argv=None):
    p = Parser(prog="data/dag/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--depth", type=int, default=3, help="hops from the root to the answer (3)")
    p.add_argument("--width", type=int, nargs=2, default=(2, 3), metavar=("MIN", "MAX"),
                   help="nodes per layer (2 3)")
    p.add_argument("--parents", type=int, default=2, help="at most this many parents per node (2)")
    p.add_argument("--symbols", type=int, default=24, help="node names are drawn from the first N letters (24)")
    p.add_argument("--n_train", type=int, default=30000)
    p.add_argument("--n_valid", type=int, default=500)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.depth < 1 or not 1 <= args.width[0] <= args.width[1] or args.parents < 1:
        p.error("--depth, --width and --parents must be at least 1 (and --width MIN <= MAX)")
    if not 2 <= args.symbols <= 52:
        p.error("--symbols must be between 2 and 52 (the letters a-z, A-Z)")
    if min(args.n_train, args.n_valid, args.n_test) < 0:
        p.error("--n_train, --n_valid and --n_test must not be negative")
    make_out_dir(p, args.out_dir)
    symbols = (string.ascii_lowercase + string.ascii_uppercase)[:args.symbols]
    rng = random.Random(args.seed)
    make = lambda: make_record(rng, args.depth, tuple(args.width), args.parents, symbols)
    seen = set()
    for split in SPLITS:
        try:
            out = distinct_records(make, getattr(args, f"n_{split}"), lambda r: r["question"], seen)
        except ValueError as e:
            print(f"prepare.py: error: {e}", file=sys.stderr)
            return 1
        path = os.path.join(args.out_dir, f"{split}.json")
        save_json(out, path)
        nodes = sum(len(r["idx_to_symbol"]) for r in out) / max(len(out), 1)
        edges = sum(len(r["edges"]) for r in out) / max(len(out), 1)
        print(f"{path}: {len(out)} graphs, {nodes:.1f} nodes, {edges:.1f} edges, {args.depth} hops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
