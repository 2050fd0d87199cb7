"""
ProntoQA: data/prontoqa/{train,valid,test}.json, generated here (no download).

The variant the paper uses: a fictional ontology, 5 hops of modus ponens, relevant distractors, in the
record format of the official preprocessing:

    question  Gulpuses are sweet. Each ompus is not happy. Every lompus is a gulpus. ... Ada is a lompus.
              Ada is a marpus. True or false: Ada is happy.
    steps     Ada is a lompus. Every lompus is a gulpus. / Ada is a gulpus. Gulpuses are tarpuses. / ... /
              Ada is a zempus. Every zempus is happy. / Ada is happy.
    answer    True

Each example is built around a chain of five concepts c1 -> c2 -> ... -> c5 and a property P of c5:
the entity is a c1, so five rule applications prove "entity is (not) P". Around it, distractors that look
relevant: every chain concept has another property and a side concept (with its own property), a
concept unconnected to the entity carries the opposite of P, and the entity also belongs to a second
concept with a small chain of its own. Every property in an example comes from a different family
(colour, size, ...), and P is stated for nothing the entity is, except c5: the context proves exactly one
answer, and the steps are that proof, two sentences a step (statement, rule), then the conclusion.

    python data/prontoqa/prepare.py                 # 9,000 / 200 / 800, like the paper's 10,000 examples
    python data/prontoqa/prepare.py --seed 1 --out_dir /tmp/prontoqa
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from machinery.argparser import Parser  # noqa: E402
from data.common import make_out_dir, save_json  # noqa: E402

HOPS = 5
NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eli", "Finn", "Gus", "Hana", "Ivy", "June", "Kai", "Leo", "Mia", "Nora"]
# nonsense concept names (plural: +"es"); a few start with a vowel so the "a"/"an" rule gets exercised
CONCEPTS = ["alpus", "blorpus", "dimpus", "drempus", "frompus", "glimpus", "gulpus", "harpus", "jarpus",
            "kimpus", "lompus", "marpus", "nerpus", "ompus", "plimpus", "quorpus", "sarpus", "tarpus", "ulpus",
            "valpus", "wimpus", "zempus"]
# one property per family in an example, so no two properties it states can clash
FAMILIES = [["blue", "red", "green", "brown", "orange"], ["small", "large", "tiny"], ["hot", "cold", "warm"],
            ["sweet", "sour", "bitter", "spicy", "salty"], ["floral", "fruity", "earthy"],
            ["metallic", "wooden", "liquid"], ["opaque", "transparent"], ["bright", "dull"],
            ["sunny", "rainy", "windy", "snowy", "cloudy"], ["melodic", "loud", "quiet", "muffled"],
            ["fast", "slow"], ["kind", "mean", "angry", "shy", "nervous", "feisty"], ["happy", "sad"]]


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def rule(rng, subject, obj, negated=False):
    """A universal rule in one of ProntoQA's three phrasings. obj is a concept (in CONCEPTS) or a property."""
    is_concept = obj in CONCEPTS
    form = rng.randrange(3)
    if form == 2:  # "Lompuses are gulpuses." / "Lompuses are not sweet."
        rest = obj + "es" if is_concept else obj
        return f"{subject.capitalize()}es are {'not ' if negated else ''}{rest}."
    rest = f"{article(obj)} {obj}" if is_concept else obj
    return f"{('Every', 'Each')[form]} {subject} is {'not ' if negated else ''}{rest}."


def statement(name, obj, negated=False):
    """A fact about the entity: "Ada is an ompus." / "Ada is not sweet."."""
    rest = f"{article(obj)} {obj}" if obj in CONCEPTS else obj
    return f"{name} is {'not ' if negated else ''}{rest}."


def make_example(rng):
    name = rng.choice(NAMES)
    c = rng.sample(CONCEPTS, 14)
    chain, sides, extra, distractor, other, other_parent = c[:5], c[5:10], c[10], c[11], c[12], c[13]
    families = rng.sample(FAMILIES, 12)
    props = [(rng.choice(f), rng.random() < 0.5) for f in families]  # (adjective, negated)
    (p, p_neg), chain_props, side_props, other_prop = props[0], props[1:5], props[5:10], props[10]

    # the proof: entity is a c1, c1 -> c2 -> ... -> c5, c5 -> P
    chain_rules = [rule(rng, a, b) for a, b in zip(chain, chain[1:])] + [rule(rng, chain[-1], p, p_neg)]
    distractors = [rule(rng, a, prop, neg) for a, (prop, neg) in zip(chain, chain_props)]
    distractors += [rule(rng, a, s) for a, s in zip(chain, sides)] + [rule(rng, chain[-1], extra)]
    distractors += [rule(rng, s, prop, neg) for s, (prop, neg) in zip(sides, side_props)]
    distractors += [rule(rng, distractor, p, not p_neg),  # the opposite of P, on something the entity isn't
                    rule(rng, other, other_prop[0], other_prop[1]), rule(rng, other, other_parent)]
    context = chain_rules + distractors
    rng.shuffle(context)
    facts = [statement(name, chain[0]), statement(name, other)]
    rng.shuffle(facts)

    # chain of thought: statement, rule, statement, rule, ..., conclusion; the steps pair them up
    cot = []
    for concept, r in zip(chain, chain_rules):
        cot += [statement(name, concept), r]
    cot.append(statement(name, p, p_neg))
    query_neg = rng.random() < 0.5
    return {"question": " ".join(context + facts) + f" True or false: {statement(name, p, query_neg)}",
            "steps": [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)],
            "answer": "True" if query_neg == p_neg else "False"}


def main(argv=None):
    p = Parser(prog="data/prontoqa/prepare.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--n_train", type=int, default=9000)
    p.add_argument("--n_valid", type=int, default=200)
    p.add_argument("--n_test", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    if min(args.n_train, args.n_valid, args.n_test) < 0:
        p.error("--n_train, --n_valid and --n_test must not be negative")
    make_out_dir(p, args.out_dir)

    # one stream, then sliced in order (first train, then valid, then test), like the official split
    rng = random.Random(args.seed)
    n = args.n_train + args.n_valid + args.n_test
    examples = [make_example(rng) for _ in range(n)]
    bounds = {"train": (0, args.n_train), "valid": (args.n_train, args.n_train + args.n_valid),
              "test": (args.n_train + args.n_valid, n)}
    for split, (a, b) in bounds.items():
        path = os.path.join(args.out_dir, f"{split}.json")
        save_json(examples[a:b], path)
        print(f"{path}: {b - a} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
