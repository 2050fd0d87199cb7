"""
A tiny ProsQA-like data set for the CPU demo, generated here (nothing to download):
data/tiny/{train,valid,test}.json, in ProsQA's record format.

    python data/tiny/prepare.py                     # 16,000 train / 300 valid / 300 test
    python data/tiny/prepare.py --steps 3 --width 16 --n_train 5000

Every record asks about one person. The person is a concept of level 0 of a small fixed "world": --steps
levels (4) of --width invented concepts (24), where every concept of a level is a kind of two concepts of the
next ("Every dampus is a lorpus", "Every dampus is a zempus"). The question lists the facts of two
chains through the world, shuffled: the person's own (person -> level 0 -> ... -> a leaf) and a
distractor chain from another level-0 concept to another leaf, then asks which leaf the person is:

    question  Every terpus is a bampus. Tom is a mumpus. Every larpus is a nampus. Every mumpus is a terpus.
              Every dampus is a larpus. Every bampus is a zampus. Every nampus is a norpus. Is Tom a norpus or zampus?
    steps     Tom is a mumpus. / Every mumpus is a terpus. / Every terpus is a bampus. / Every bampus is a zampus.
    answer    Tom is a zampus.

Why a fixed world, unlike ProsQA's fresh graph per question: a model trained from scratch on a CPU
cannot learn in minutes to look a fact up in its context by name (an induction circuit: measured here,
a 2-layer model stayed at chance for 2,000 steps of 128 sequences on 2-hop questions with shuffled
facts). It learns the world's "is a" rules in a few hundred steps instead; what the question's facts
still decide is which of a concept's two kinds the chain goes through, and the distractor's leaf is
mostly also a descendant of the person's concept in the world (a hard negative), so the world alone
does not give the answer. It does not force steps either: a model answering at once (No-CoT) learns
it too, only more slowly, by memorizing which leaves the kinds present in a question lead to (the
demo prints both curves). The records keep ProsQA's graph fields (idx_to_symbol, edges, root,
target, neg_target), so sample.py --analyze reads the demo model's thoughts as it reads ProsQA's.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from machinery.argparser import Parser  # noqa: E402
from data.common import make_out_dir, save_json  # noqa: E402

PERSONS = ["Alex", "Bob", "Eva", "Max", "Sam", "Tom", "Amy", "Rex"]
# 120 invented concepts, "bampus" to "zorpus": each is one token of the compact vocabulary
CONCEPTS = [c + v + "pus" for c in "bdfghklmnprstvz" for v in ("am", "em", "im", "om", "um", "ar", "er", "or")]


def make_world(levels, width, seed):
    """`levels` lists of `width` concepts; kinds[c] = the two concepts of the next level that every c is."""
    rng = random.Random(seed)
    names = rng.sample(CONCEPTS, levels * width)
    world = [names[i * width:(i + 1) * width] for i in range(levels)]
    kinds = {c: rng.sample(world[i + 1], 2) for i in range(levels - 1) for c in world[i]}
    return world, kinds


def chain(rng, start, kinds, n):
    nodes = [start]
    while len(nodes) < n:
        nodes.append(rng.choice(kinds[nodes[-1]]))
    return nodes


def make_record(rng, world, kinds, hard=0.8, persons=PERSONS):
    """One question. The person's chain goes down every level; so does the distractor's, from another root."""
    levels = len(world)
    for _ in range(100_000):
        path = chain(rng, rng.choice(world[0]), kinds, levels)
        other = chain(rng, rng.choice([c for c in world[0] if c != path[0]]), kinds, levels)
        if len(set(path + other)) < 2 * levels:
            continue
        # the distractor never holds the other kind of a concept on the path: at every step exactly one
        # of the current concept's two kinds appears in the question
        if {k for a, b in zip(path, path[1:]) for k in kinds[a] if k != b} & set(other):
            continue
        reach = {path[0]}
        for _ in range(levels - 1):
            reach = {k for c in reach for k in kinds[c]}
        if other[-1] in reach or rng.random() >= hard:
            break  # mostly a hard negative: the wrong leaf is a descendant of the person's concept too
    else:
        raise ValueError("no question fits this world: give it more --width (or less --hard)")
    person = rng.choice(persons)
    symbols = [person] + path + other  # node i of the graph
    n = levels
    edges = [[0, 1]] + [[i, i + 1] for i in range(1, n)] + [[i, i + 1] for i in range(n + 1, 2 * n)]

    def fact(parent, child):
        return f"{symbols[parent] if parent == 0 else 'Every ' + symbols[parent]} is a {symbols[child]}."

    steps = [fact(p, c) for p, c in edges[:n]]  # the person's chain, in order
    facts = [fact(p, c) for p, c in edges]
    rng.shuffle(facts)
    options = [path[-1], other[-1]]
    rng.shuffle(options)
    return dict(question=" ".join(facts) + f" Is {person} a {options[0]} or {options[1]}?", steps=steps,
                answer=f"{person} is a {path[-1]}.", idx_to_symbol=symbols, edges=edges, root=0, target=n,
                neg_target=2 * n)


def main(argv=None):
    p = Parser(prog="data/tiny/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--n_train", type=int, default=16000)
    p.add_argument("--n_valid", type=int, default=300)
    p.add_argument("--n_test", type=int, default=300)
    p.add_argument("--steps", type=int, default=4, help="reasoning steps per question = levels of the world (2-6)")
    p.add_argument("--width", type=int, default=24, help="concepts per level of the world")
    p.add_argument("--n_persons", type=int, default=len(PERSONS), help=f"person names in use (1-{len(PERSONS)})")
    p.add_argument("--hard", type=float, default=0.8, help="fraction of questions whose wrong leaf the person's "
                                                           "concept also reaches in the world (when possible)")
    p.add_argument("--seed", type=int, default=0, help="draws the questions")
    p.add_argument("--world_seed", type=int, default=1234, help="draws the world")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    if min(args.n_train, args.n_valid, args.n_test) < 1:
        p.error("--n_train, --n_valid and --n_test must be at least 1")
    if not 2 <= args.steps <= 6:
        p.error("--steps must be between 2 and 6")
    if not 4 <= args.width or args.steps * args.width > len(CONCEPTS):
        p.error(f"--width must be at least 4 and --steps x --width at most {len(CONCEPTS)} (the invented names)")
    if not 1 <= args.n_persons <= len(PERSONS):
        p.error(f"--n_persons must be between 1 and {len(PERSONS)}")
    if not 0.0 <= args.hard <= 1.0:
        p.error("--hard must be between 0 and 1")

    world, kinds = make_world(args.steps, args.width, args.world_seed)
    make_record(random.Random(0), world, kinds, args.hard)  # fails fast, in one line, if no question fits
    rng = random.Random(args.seed)
    # valid and test first; train never repeats one of their questions
    persons = PERSONS[:args.n_persons]
    splits = {s: [make_record(rng, world, kinds, args.hard, persons) for _ in range(n)]
              for s, n in (("valid", args.n_valid), ("test", args.n_test))}
    held_out = {r["question"] for s in splits.values() for r in s}
    train = []
    while len(train) < args.n_train:
        r = make_record(rng, world, kinds, args.hard, persons)
        if r["question"] not in held_out:
            train.append(r)
    splits["train"] = train
    make_out_dir(p, args.out_dir)
    for name in ("train", "valid", "test"):
        path = os.path.join(args.out_dir, f"{name}.json")
        save_json(splits[name], path)
        print(f"{path}: {len(splits[name])} records")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit(f"prepare.py: error: {e}")
