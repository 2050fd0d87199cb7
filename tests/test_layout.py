"""The import graph, read from the source with ast: the README's arrow data -> curriculum -> coconut -> gpt.

Pure static reading (nothing is imported), so it runs anywhere, in well under a second.
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The root is the tutorial: the card's five files, read in this order. Everything else is one folder down.
ROOT_FILES = ["gpt.py", "coconut.py", "curriculum.py", "train.py", "sample.py"]
PACKAGE = "machinery"
SCRIPTS = {"train", "sample"}  # run from the command line; nothing imports them
TOOLS = {"machinery.bench", "machinery.gpu_check"}  # run as files (python machinery/bench.py); nothing imports them
# The data side, in reading order: a module here imports only the ones before it.
DATA_SIDE = ["machinery.tokenizer", "machinery.records", "machinery.icot", "curriculum"]
MODEL_SIDE = {"gpt", "machinery.llama", "coconut"}  # the model: knows token ids and vectors, nothing of the data
COCONUT_MAY_IMPORT = {"gpt"}
# Beside the arrow (evaluate, analysis, plots, checkpoint, resume, demo, ...) a module may import either side,
# but not a script.


def module_name(path):
    """tests/x.py -> None; train.py -> "train"; machinery/records.py -> "machinery.records";
    data/prosqa/prepare.py -> "data.prosqa.prepare"."""
    rel = os.path.relpath(path, ROOT)
    if rel.startswith("tests" + os.sep) or not rel.endswith(".py"):
        return None
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("tests", "__pycache__"))
        for f in sorted(filenames):
            if f.endswith(".py") and os.path.relpath(dirpath, ROOT).split(os.sep)[0] in (".", "data", PACKAGE):
                yield os.path.join(dirpath, f)


def imports_of(source, modules):
    """The project modules (names in `modules`) a source imports anywhere in it, nested imports too."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # from data import common
        for n in names:
            if n in modules:
                found.add(n)
    return found


def import_graph():
    files = {module_name(p): p for p in project_files()}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = imports_of(f.read(), modules) - {name}
    return graph


def violations(graph):
    """Every broken rule of the layout in an import map {module: set of project modules it imports}."""
    out = []
    rank = {m: i for i, m in enumerate(DATA_SIDE)}
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if d in SCRIPTS:
                out.append(f"{m} imports the script {d}")
            if d in TOOLS:
                out.append(f"{m} imports the tool {d}")
            if m == "coconut" and d not in COCONUT_MAY_IMPORT:
                out.append(f"coconut imports {d}: the model file may import only {sorted(COCONUT_MAY_IMPORT)}")
            if m in MODEL_SIDE and d in rank:
                out.append(f"{m} (the model) imports {d} (the data side)")
            if m in rank and d not in rank and not d.startswith("data"):
                out.append(f"{m} (the data side) imports {d}, which is not on the data side")
            if m in rank and d in rank and rank[d] >= rank[m]:
                out.append(f"{m} imports {d}, which comes after it in {' -> '.join(DATA_SIDE)}")
            if m.startswith("data.") and (d in MODEL_SIDE or d == "curriculum" or d in SCRIPTS):
                out.append(f"{m} (a data set) imports {d}")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles({m: d for m, d in graph.items()
                                                                if m not in SCRIPTS | TOOLS})]
    return out


def cycles(graph):
    """One cycle per strongly connected group of modules that import each other, as [a, b, ..., a]."""
    found, done = [], set()

    def visit(m, path):
        if m in path:
            cycle = path[path.index(m):] + [m]
            if not set(cycle) & done:
                found.append(cycle)
                done.update(cycle)
            return
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])

    for m in sorted(graph):
        visit(m, [])
    return found


# -----------------------------------------------------------------------------

M = PACKAGE + "."  # the package's prefix, in the hand-made maps below


def test_the_root_holds_the_five_files_and_the_package_the_rest():
    root_py = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert root_py == sorted(ROOT_FILES)
    package = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, PACKAGE)) if f.endswith(".py"))
    assert {"tokenizer", "records", "icot", "llama", "checkpoint", "resume", "demo", "parallel", "bench",
            "gpu_check", "analysis", "report", "runs"} <= set(package)
    graph = import_graph()
    from_package = {m: d for m, d in graph.items() if m.startswith(M)}
    assert from_package and not any(d & SCRIPTS for d in from_package.values())  # nothing in it imports a script


def test_the_project_follows_its_layout():
    graph = import_graph()
    assert {"coconut", "curriculum", M + "tokenizer", M + "records", M + "icot", M + "evaluate", "gpt",
            "train"} <= set(graph)
    assert graph["coconut"] <= {"gpt"}  # (today not even gpt: the model it runs is handed to it)
    assert violations(graph) == []


def test_the_import_map_as_read_from_the_source():
    # A few edges the layout relies on, so that a parser that finds nothing cannot pass the test above.
    graph = import_graph()
    assert {M + "tokenizer", M + "records", M + "icot"} <= graph["curriculum"]
    assert graph[M + "records"] == {M + "tokenizer"} and graph[M + "icot"] == {M + "records"}
    assert graph[M + "tokenizer"] == set()
    assert "curriculum" in graph[M + "evaluate"] and M + "evaluate" in graph["train"] and "coconut" in graph["train"]
    assert "data.common" in graph["gpt"]  # a nested import: gpt.download_hub_weights
    assert M + "analysis" in graph[M + "plots"]   # also nested
    assert {M + "resume", M + "demo", M + "parallel"} <= graph["train"]  # the loop's machinery, one folder down


def test_imports_of_reads_every_form():
    modules = {"a", "b", "c", "data.common", "data", "machinery.x", "machinery"}
    src = ("import a\nfrom b import x as y\ndef f():\n    from data.common import g\nfrom data import common\n"
           "import os\nfrom machinery import x\n")
    assert imports_of(src, modules) == {"a", "b", "data.common", "data", "machinery.x", "machinery"}


def test_violations_catch_each_broken_rule():
    ok = {M + "tokenizer": set(), M + "records": {M + "tokenizer"}, M + "icot": {M + "records"},
          "curriculum": {M + "tokenizer", M + "records", M + "icot"}, "gpt": {"data.common"}, "coconut": set(),
          M + "evaluate": {"curriculum"}, "train": {"coconut", "curriculum", M + "evaluate"}}
    assert violations(ok) == []

    def broken(module, *deps):
        g = {m: set(d) for m, d in ok.items()}
        g.setdefault(module, set()).update(deps)
        return violations(g)

    assert broken("sample", "train") == ["sample imports the script train"]
    assert broken(M + "demo", "train") == [f"{M}demo imports the script train"]
    assert broken(M + "report", M + "bench") == [f"{M}report imports the tool {M}bench"]
    assert broken("coconut", "gpt") == []
    assert any("coconut imports curriculum" in v for v in broken("coconut", "curriculum"))
    assert broken("coconut", M + "evaluate") == [f"coconut imports {M}evaluate: the model file may import only "
                                                 f"['gpt']"]
    assert broken("gpt", M + "tokenizer") == [f"gpt (the model) imports {M}tokenizer (the data side)"]
    assert broken("curriculum", "coconut") == ["curriculum (the data side) imports coconut, which is not on the "
                                               "data side"]
    v = broken(M + "tokenizer", M + "records")
    assert (f"{M}tokenizer imports {M}records, which comes after it in {M}tokenizer -> {M}records -> {M}icot -> "
            f"curriculum") in v
    assert any(x.startswith(f"import cycle: {M}records -> {M}tokenizer -> {M}records") for x in v)
    assert broken("data.prosqa.prepare", "coconut") == ["data.prosqa.prepare (a data set) imports coconut"]
    assert broken(M + "evaluate", M + "analysis") + broken(M + "analysis", M + "evaluate") == []  # one way is fine
    g = {**ok, M + "analysis": {M + "evaluate"}, M + "evaluate": {"curriculum", M + "analysis"}}
    assert violations(g) == [f"import cycle: {M}analysis -> {M}evaluate -> {M}analysis"]


# -----------------------------------------------------------------------------
# The README's code tour: one line a file, `path  lines  job`, its counts the files' own

TOUR_LINE = re.compile(r"^(\S+\.py)\s+(\d+)\s+\S")


def code_tour(readme):
    """The README's code tour block -> [(path, lines as written)], in its order."""
    text = readme.split("## Code tour", 1)[1]
    block = text.split("```", 2)[1]
    return [(m.group(1), int(m.group(2))) for m in map(TOUR_LINE.match, block.splitlines()) if m]


def test_the_code_tour_counts_every_line_of_every_file():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        tour = code_tour(f.read())
    paths = [p for p, _ in tour]
    assert paths[:5] == ROOT_FILES  # the reading order: gpt -> coconut -> curriculum -> train -> sample
    package = sorted(f"{PACKAGE}/{f}" for f in os.listdir(os.path.join(ROOT, PACKAGE))
                     if f.endswith(".py") and f != "__init__.py")
    assert sorted(paths[5:]) == package  # then every module of the package, once
    for path, written in tour:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert written == len(f.read().splitlines()), f"README's code tour: {path} has " \
                f"{len(open(os.path.join(ROOT, path)).read().splitlines())} lines, not {written}"


def test_code_tour_reads_the_block():
    readme = "x\n## Code tour\n\ntext\n```\ngpt.py   12  GPT-2\nmachinery/a.py  3  a job\n  (a note)\n```\nmore ```\n"
    assert code_tour(readme) == [("gpt.py", 12), ("machinery/a.py", 3)]


def test_the_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250


# -----------------------------------------------------------------------------
# Checkpoints written before the move (every module at the root) still load and answer alike

def test_a_checkpoint_of_the_flat_layout_answers_as_it_did():
    import json

    import torch

    from curriculum import prompt
    from machinery.checkpoint import load_checkpoint
    from machinery.evaluate import generate_batched
    from machinery.records import tokenize
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    with open(os.path.join(fixtures, "flat-layout-answers.json")) as f:
        before = json.load(f)  # what the flat layout's own code answered with this checkpoint
    model, tok, ckpt = load_checkpoint(os.path.join(fixtures, "flat-layout-best.pt"))
    prompts = [prompt(tokenize(r, tok), ckpt["config"], int(ckpt["stage"]), tok) for r in before["records"]]
    outs, thoughts = generate_batched(model.eval(), prompts, 10, 5)
    assert [tok.decode(o) for o in outs] == before["answers"]
    norms = [[float(t.norm()) for t in th] for th in thoughts]
    assert torch.allclose(torch.tensor(norms), torch.tensor(before["thought_norms"]), atol=1e-3)
