"""
Reach: graph search that a CPU can learn, the CPU demo's data: data/reach/{train,valid,test}.json.
Nothing to download.

One fixed world of possible roads, the same in every question: --depth + 1 layers of --width nodes, every node
with --children possible children in the next layer. In each question two first-layer nodes open --branches
of their roads each, and every branch grows down the world's roads into nodes that no other branch holds, a
chain of one node a layer by default (--fan 1), to the last layer. One of the two roots, drawn after both
grew, is the start; the question asks which of two last-layer nodes the open roads reach from it:

    question  c1>d4 b4>c1 c7>d0 ... c0>d2 [Q] e0 e2 [R] a6    the open roads (one token each), options, start
    steps     b0 / c3 / d7 / e0                               the start's chain that ends in the target
    answer    e0
    graph     idx_to_symbol, edges, root, target, neg_target

Every road is one token, so one attention head reads it (a road written as two node tokens needs a circuit a
small model does not learn in minutes: see docs/search.md). The two trees are alike, so nothing but following
--depth roads tells the options apart: a model that answers at once must do every hop inside one forward
pass; a chain of thought must pick one of the start's branches before it can see which one reaches an option
(from a wrong one, nothing does); continuous thoughts can follow all of them at once.

    python data/reach/prepare.py                           # 30,000 / 500 / 500 questions, 4 hops
    python data/reach/prepare.py --depth 5 --width 10 --fan 2
    python data/reach/prepare.py --branches 0 --open 0.5   # roads open at random instead (docs/search.md, 3)
    python data/reach/prepare.py --chain backward          # the chain from the first option back to its root

--chain backward is a control for CoT (docs/search.md, 6): every node of a branch has one parent, so the chain
written from the first option back up its roads needs no guess; the answer is that option if the chain ends
at the start, else the other one.
"""
import os
import random
import string
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from machinery.argparser import Parser  # noqa: E402
from data.common import distinct_records, make_out_dir, save_json  # noqa: E402

SPLITS = ("train", "valid", "test")


def make_world(rng, depth, width, n_children):
    """Node i is layer i // width; names a0.. for layer 0, b0.. for layer 1, ... Returns (names, roads): every
    node's n_children possible children in the next layer, the same in every question."""
    names = [f"{string.ascii_lowercase[i // width]}{i % width}" for i in range((depth + 1) * width)]
    roads = [[] for _ in names]
    for layer in range(depth):
        below = range((layer + 1) * width, (layer + 2) * width)
        for v in range(layer * width, (layer + 1) * width):
            roads[v] = sorted(rng.sample(below, n_children))
    return names, roads


def reachable(children, start):
    """{node: hops from start} for every node reachable from start."""
    dist, todo = {start: 0}, [start]
    while todo:
        v = todo.pop(0)
        for c in children[v]:
            if c not in dist:
                dist[c] = dist[v] + 1
                todo.append(c)
    return dist


def make_branching_record(rng, names, roads, depth, width, n_branches=3, hops_per_step=1, fan=2, backward=False,
                          max_tries=10000):
    """
    One question whose open roads form separate branches: two first-layer nodes each open n_branches of their
    roads, and each branch grows down the world's roads into nodes that no other branch holds (every node up
    to fan children), so branches never meet and every one reaches the last layer. The two trees grow in turn,
    hop by hop, and which root is the start is drawn afterwards, so nothing but the roads tells the start's
    tree from the other's. The target ends one of the start's branches, the negative one of the other's. A
    chain of thought must pick the start's branch before it can see which one reaches an option; from a wrong
    branch nothing reaches either option.
    """
    last = range(depth * width, (depth + 1) * width)
    for _ in range(max_tries):
        roots = rng.sample(range(width), 2)
        owner, children = {}, [[] for _ in names]
        frontier = []  # (node, branch): the nodes of the hop that grows next
        for root in roots:
            if len(roads[root]) < n_branches:
                break
            for first in rng.sample(roads[root], n_branches):
                if first in owner:
                    break
                owner[first] = (root, first)
                children[root].append(first)
                frontier.append((first, (root, first)))
        if len(frontier) < 2 * n_branches:
            continue
        for _hop in range(depth - 1):
            rng.shuffle(frontier)  # neither tree chooses first
            nxt = []
            for v, branch in frontier:
                free = [c for c in roads[v] if c not in owner]
                for c in rng.sample(free, min(len(free), rng.randint(1, fan))):
                    owner[c] = branch
                    children[v].append(c)
                    nxt.append((c, branch))
            frontier = nxt
        if len({branch for _, branch in frontier}) == 2 * n_branches:  # every branch reached the last layer
            break
    else:
        raise ValueError("no question found: fewer --branches or a wider world")
    start, other = roots if rng.random() < 0.5 else roots[::-1]
    mine = reachable(children, start)
    target = rng.choice([v for v in last if v in mine])
    neg = rng.choice([v for v in last if owner.get(v, (None,))[0] == other])
    return finish_record(rng, names, children, start, mine, target, neg, hops_per_step, backward)


def make_record(rng, names, roads, depth, width, p_open, hops_per_step=1, max_tries=1000):
    """One question: the open roads, a start, an option reachable from it and one reachable only from another
    start (so both have a full chain of open roads behind them)."""
    last = range(depth * width, (depth + 1) * width)
    for _ in range(max_tries):
        children = [[c for c in cs if rng.random() < p_open] for cs in roads]
        start = rng.randrange(width)
        mine = reachable(children, start)
        others = set().union(*(reachable(children, s) for s in range(width) if s != start))
        targets = [v for v in last if v in mine]
        negatives = [v for v in last if v in others and v not in mine]
        # a chain of thought must choose among the start's roads before it sees where they lead: keep the
        # questions in which some road from the start cannot reach the target
        if targets and negatives and len(children[start]) >= 2:
            target = rng.choice(targets)
            if not all(target in reachable(children, c) for c in children[start]):
                break
    else:
        raise ValueError("no question found: raise --open or --children")
    neg = rng.choice(negatives)
    return finish_record(rng, names, children, start, mine, target, neg, hops_per_step)


def finish_record(rng, names, children, start, mine, target, neg, hops_per_step, backward=False):
    """
    The record of a question: its open roads in random order, one open path to the target as the steps
    (forward from the start), or with backward the path from the first option up to a first-layer node,
    the one parent of each node in turn (branching questions only).
    """
    path = [target]  # back from the target through random parents reachable from the start: one hop a layer
    while path[-1] != start:
        path.append(rng.choice([v for v in mine if path[-1] in children[v]]))
    edges = [[v, c] for v in range(len(names)) for c in children[v]]
    rng.shuffle(edges)
    options = [target, neg]
    rng.shuffle(options)
    question = (" ".join(f"{names[v]}>{names[c]}" for v, c in edges) +
                f" [Q] {names[options[0]]} {names[options[1]]} [R] {names[start]}")
    walk = [names[v] for v in path[::-1][1:]]
    if backward:
        parent = {c: v for v, c in edges}
        up = [options[0]]
        while up[-1] in parent:
            up.append(parent[up[-1]])
        walk = [names[v] for v in up[1:]]  # the first option's parent, ..., its root
    steps = [" ".join(walk[i:i + hops_per_step]) for i in range(0, len(walk), hops_per_step)]
    return dict(question=question, steps=steps, answer=names[target],
                idx_to_symbol=names, edges=edges, root=start, target=target, neg_target=neg)


def main(argv=None):
    p = Parser(prog="data/reach/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--depth", type=int, default=4, help="hops from the start to the options (4)")
    p.add_argument("--width", type=int, default=8, help="nodes per layer (8)")
    p.add_argument("--children", type=int, default=4, help="possible children of every node (4)")
    p.add_argument("--open", type=float, default=0.5, help="probability that a road is open in a question (0.5)")
    p.add_argument("--branches", type=int, default=3, help="separate branches from each of the two roots (3; "
                                                              "make_branching_record); 0: roads open at random")
    p.add_argument("--fan", type=int, default=1, help="most children of a node in a branch (1: every branch a chain)")
    p.add_argument("--hops_per_step", type=int, default=1, help="nodes of the path in one step of the chain of "
                                                                  "thought, which one continuous thought replaces (1)")
    p.add_argument("--chain", default="forward", choices=("forward", "backward"),
                   help="the steps: the path from the start to the target (forward), or from the first option back "
                        "to its root (backward: a control for CoT, branching questions only)")
    p.add_argument("--n_train", type=int, default=30000)
    p.add_argument("--n_valid", type=int, default=500)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="draws the world, then the questions")
    args = p.parse_args(argv)
    if not (1 <= args.depth <= 25 and 2 <= args.width and 1 <= args.children <= args.width):
        p.error("need 1 <= --depth <= 25, --width >= 2 and 1 <= --children <= --width")
    if args.fan < 1:
        p.error("--fan must be at least 1")
    if args.hops_per_step < 1:
        p.error("--hops_per_step must be at least 1")
    if not 0 < args.open <= 1:
        p.error("--open must be in (0, 1]")
    if args.chain == "backward" and not args.branches:
        p.error("--chain backward needs branching questions (--branches > 0): roads open at random give a node "
                "several parents")
    make_out_dir(p, args.out_dir)
    rng = random.Random(args.seed)
    names, roads = make_world(rng, args.depth, args.width, args.children)
    if args.branches:
        make = lambda: make_branching_record(rng, names, roads, args.depth, args.width, args.branches,
                                             args.hops_per_step, args.fan, args.chain == "backward")
    else:
        make = lambda: make_record(rng, names, roads, args.depth, args.width, args.open, args.hops_per_step)
    key = lambda r: (r["root"], r["target"], r["neg_target"], tuple(sorted(map(tuple, r["edges"]))))
    seen = set()
    for split in SPLITS:
        try:
            out = distinct_records(make, getattr(args, f"n_{split}"), key, seen)
        except ValueError as e:
            print(f"prepare.py: error: {e}", file=sys.stderr)
            return 1
        path = os.path.join(args.out_dir, f"{split}.json")
        save_json(out, path)
        edges = sum(len(r["edges"]) for r in out) / max(len(out), 1)
        print(f"{path}: {len(out)} questions, {len(names)} nodes, {edges:.1f} open roads, {args.depth} hops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
