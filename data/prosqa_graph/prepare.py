"""
ProsQA graph: data/prosqa_graph/{train,valid,test}.json, the symbolic ProsQA of "Reasoning by Superposition"
(Zhu, Hao et al. 2025). It keeps the ProsQA questions whose target is 3 or 4 hops from the root (the paper's
subset: 14,785 / 257 / 419) and writes them in node symbols, one symbol per node:

    question  0 2 | 3 7 | 2 9 | ... [Q] 16 13 [R] 1   every edge "parent child", the two options, the root
                                                      (records.graph_question, edges and options shuffled)
    steps     5 / 9 / 16                              the nodes of one shortest path from the root, one a hop
    answer    16
    graph     idx_to_symbol, edges, root, target, neg_target, as in ProsQA; idx_to_symbol[i] is "i"

With --permute node i is named by a random id in 0..30 drawn per question instead: then a node's name says
nothing about where it was grown (ProsQA's indices follow the growth order, seeds first), a shortcut the
training-dynamics follow-up (arXiv 2509.23365) removes this way.

    python data/prosqa_graph/prepare.py                                # download ProsQA, keep 3-4 hops
    python data/prosqa_graph/prepare.py --generate --seed 1            # 14,785 / 257 / 419 from Algorithm 1
    python data/prosqa_graph/prepare.py --from_dir data/prosqa         # convert a ProsQA set already on disk
"""
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from machinery.argparser import Parser  # noqa: E402
import data.prosqa.prepare as prosqa  # noqa: E402
from machinery.records import graph_question  # noqa: E402
from data.common import download, make_out_dir, save_json  # noqa: E402

SPLITS = {"train": 14785, "valid": 257, "test": 419}  # the paper's subset of the official files
MIN_HOPS, MAX_HOPS = 3, 4
MAX_NODES = 31  # node symbols "0".."30": the paper's vocabulary of 40 holds 31 of them (ProsQA's graphs have <= 28)


# -----------------------------------------------------------------------------
# one ProsQA record -> one ProsQA graph record

def shortest_path(r):
    """The nodes after the root on one shortest root->target path ([] if the target is unreachable).

    The record's own steps when they walk a shortest path (a step names the node it reaches last: "Tom is a
    terpus." / "Every terpus is a brimpus."), so the graph set keeps the text set's path; else the first one
    found walking back from the target through the first parent (in edge order) one hop closer to the root.
    """
    names, root, target = r["idx_to_symbol"], r["root"], r["target"]
    children = [[] for _ in names]
    for p, c in r["edges"]:
        children[p].append(c)
    dist = prosqa.bfs(children, root)
    if target not in dist:
        return []
    index = {s: i for i, s in enumerate(names)}
    own = [index.get((s.rstrip(". ").split() or [""])[-1]) for s in r["steps"]]
    walk = [root] + own
    if len(own) == dist[target] and own[-1:] == [target] and all(c in children[p] for p, c in zip(walk, walk[1:])):
        return own
    path = [target]
    while path[-1] != root:
        path.append(next(p for p, c in r["edges"] if c == path[-1] and dist.get(p) == dist[c] - 1))
    return path[::-1][1:]  # in order from the root, the root itself left out


def node_names(n, rng, permute):
    if n > MAX_NODES:
        raise ValueError(f"a graph of {n} nodes: there are only {MAX_NODES} node symbols")
    if not permute:
        return [str(i) for i in range(n)]
    ids = list(range(MAX_NODES))
    rng.shuffle(ids)
    return [str(i) for i in ids[:n]]


def to_graph(r, path, rng, permute):
    names = node_names(len(r["idx_to_symbol"]), rng, permute)
    g = dict(idx_to_symbol=names, edges=[list(e) for e in r["edges"]], root=r["root"], target=r["target"],
             neg_target=r["neg_target"])
    return dict(question=graph_question(g, rng), steps=[names[i] for i in path], answer=names[r["target"]], **g)


def convert(records, rng, permute=False):
    """The records of 3-4 hops as graph records; also how many were too far (or near) and too big."""
    out, far, big = [], 0, 0
    for r in records:
        path = shortest_path(r)
        if not MIN_HOPS <= len(path) <= MAX_HOPS:
            far += 1
        elif len(r["idx_to_symbol"]) > MAX_NODES:
            big += 1
        else:
            out.append(to_graph(r, path, rng, permute))
    return out, far, big


# -----------------------------------------------------------------------------
# where the ProsQA records come from

def graph_key(r):
    """A question's graph, whatever its names and shuffles: sorted edges, root, the two options."""
    return tuple(sorted(map(tuple, r["edges"]))), r["root"], tuple(sorted((r["target"], r["neg_target"])))


def generate(n, rng, seen):
    """n ProsQA records of 3-4 hops from Algorithm 1 (data/prosqa), none with a graph in seen (which grows)."""
    out = []
    while len(out) < n:
        for r in prosqa.generate(min(1000, n - len(out)), rng, min_hops=MIN_HOPS, max_hops=MAX_HOPS):
            if graph_key(r) not in seen:  # a graph twice, across splits above all, would leak the answer
                seen.add(graph_key(r))
                out.append(r)
    return out


def fetch(base_url, out_dir):
    """The official files, kept in out_dir as prosqa_{split}.json: a rerun downloads nothing."""
    sources = {}
    for split in SPLITS:
        cache = os.path.join(out_dir, f"prosqa_{split}.json")
        download(f"{base_url.rstrip('/')}/prosqa_{split}.json", cache)
        try:
            sources[split] = prosqa.check_records(cache)
        except RuntimeError:
            os.remove(cache)  # don't leave a bad file that the next run would trust
            raise
    return sources


def read_dir(src):
    """The text ProsQA splits found in src, as prosqa_{split}.json (preferred) or {split}.json."""
    sources = {}
    for split in SPLITS:
        for name in (f"prosqa_{split}.json", f"{split}.json"):
            if os.path.exists(os.path.join(src, name)):
                sources[split] = prosqa.check_records(os.path.join(src, name))
                break
    if not sources:
        raise RuntimeError(f"no prosqa_{{train,valid,test}}.json or {{train,valid,test}}.json in {src}")
    return sources


def main(argv=None):
    p = Parser(prog="data/prosqa_graph/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--base_url", default=os.environ.get("PROSQA_BASE_URL", prosqa.BASE_URL),
                   help="where prosqa_{train,valid,test}.json are (env PROSQA_BASE_URL)")
    p.add_argument("--generate", action="store_true", help="grow the set with Algorithm 1 instead of downloading")
    p.add_argument("--from_dir", help="convert the text ProsQA files in this directory instead of downloading")
    p.add_argument("--n_train", type=int, default=SPLITS["train"], help="with --generate")
    p.add_argument("--n_valid", type=int, default=SPLITS["valid"], help="with --generate")
    p.add_argument("--n_test", type=int, default=SPLITS["test"], help="with --generate")
    p.add_argument("--permute", action="store_true", help=f"name nodes by random ids in 0..{MAX_NODES - 1}")
    p.add_argument("--seed", type=int, default=0, help="draws the graphs (--generate), shuffles and names")
    args = p.parse_args(argv)
    if args.generate and args.from_dir:
        p.error("--generate and --from_dir exclude each other")
    if min(args.n_train, args.n_valid, args.n_test) < 0:
        p.error("--n_train, --n_valid and --n_test must not be negative")
    if args.from_dir and not os.path.isdir(args.from_dir):
        p.error(f"--from_dir {args.from_dir} is not a directory")
    make_out_dir(p, args.out_dir)

    rng = random.Random(args.seed)  # everything below draws from it in a fixed order: the files follow the seed
    if args.generate:
        seen = set()
        sources = {split: generate(getattr(args, f"n_{split}"), rng, seen) for split in SPLITS}
    else:
        try:
            sources = read_dir(args.from_dir) if args.from_dir else fetch(args.base_url, args.out_dir)
        except RuntimeError as e:
            hint = "" if args.from_dir else " (offline? --generate makes the set here; --base_url points at a mirror)"
            print(f"prepare.py: error: {e}{hint}", file=sys.stderr)
            return 1
    for split, records in sources.items():
        out, far, big = convert(records, rng, args.permute)
        path = os.path.join(args.out_dir, f"{split}.json")
        save_json(out, path)
        s = prosqa.stats(out)
        note = "" if args.generate or args.from_dir or len(out) == SPLITS[split] else f", the paper has {SPLITS[split]}"
        print(f"{path}: {len(out)} records ({len(records)} read, {far} not {MIN_HOPS}-{MAX_HOPS} hops, {big} over "
              f"{MAX_NODES} nodes dropped{note}); {s['nodes']:.1f} nodes, {s['edges']:.1f} edges, {s['hops']:.2f} hops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
