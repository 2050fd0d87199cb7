"""The import graph, read from the source with ast: the README's arrow data -> curriculum -> coconut -> gpt.

Pure static reading (nothing is imported), so it runs anywhere, in well under a second.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {"train", "sample", "bench", "gpu_check"}  # run from the command line; nothing imports them
# The data side, in reading order: a module here imports only the ones before it.
DATA_SIDE = ["tokenizer", "records", "icot", "curriculum"]
MODEL_SIDE = {"gpt", "llama", "coconut"}  # the model: knows token ids and vectors, nothing of the data
COCONUT_MAY_IMPORT = {"gpt"}
# Beside the arrow (analysis, evaluate, plots, checkpoint) a module may import either side, but not a script.


def module_name(path):
    """tests/x.py -> None; train.py -> "train"; data/prosqa/prepare.py -> "data.prosqa.prepare"."""
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
            if f.endswith(".py") and os.path.relpath(dirpath, ROOT).split(os.sep)[0] in (".", "data"):
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
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles({m: d for m, d in graph.items() if m not in SCRIPTS})]
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

def test_the_project_follows_its_layout():
    graph = import_graph()
    assert {"coconut", "curriculum", "tokenizer", "records", "icot", "evaluate", "gpt", "train"} <= set(graph)
    assert graph["coconut"] <= {"gpt"}  # (today not even gpt: the model it runs is handed to it)
    assert violations(graph) == []


def test_the_import_map_as_read_from_the_source():
    # A few edges the layout relies on, so that a parser that finds nothing cannot pass the test above.
    graph = import_graph()
    assert {"tokenizer", "records", "icot"} <= graph["curriculum"]
    assert graph["records"] == {"tokenizer"} and graph["icot"] == {"records"} and graph["tokenizer"] == set()
    assert "curriculum" in graph["evaluate"] and "evaluate" in graph["train"] and "coconut" in graph["train"]
    assert "data.common" in graph["gpt"]  # a nested import: gpt.download_hub_weights
    assert "analysis" in graph["plots"]   # also nested


def test_imports_of_reads_every_form():
    modules = {"a", "b", "c", "data.common", "data"}
    src = "import a\nfrom b import x as y\ndef f():\n    from data.common import g\nfrom data import common\nimport os\n"
    assert imports_of(src, modules) == {"a", "b", "data.common", "data"}


def test_violations_catch_each_broken_rule():
    ok = {"tokenizer": set(), "records": {"tokenizer"}, "icot": {"records"},
          "curriculum": {"tokenizer", "records", "icot"}, "gpt": {"data.common"}, "coconut": set(),
          "evaluate": {"curriculum"}, "train": {"coconut", "curriculum", "evaluate"}}
    assert violations(ok) == []

    def broken(module, *deps):
        g = {m: set(d) for m, d in ok.items()}
        g.setdefault(module, set()).update(deps)
        return violations(g)

    assert broken("sample", "train") == ["sample imports the script train"]
    assert broken("coconut", "gpt") == []
    assert any("coconut imports curriculum" in v for v in broken("coconut", "curriculum"))
    assert broken("coconut", "evaluate") == ["coconut imports evaluate: the model file may import only ['gpt']"]
    assert broken("gpt", "tokenizer") == ["gpt (the model) imports tokenizer (the data side)"]
    assert broken("curriculum", "coconut") == ["curriculum (the data side) imports coconut, which is not on the data side"]
    v = broken("tokenizer", "records")
    assert "tokenizer imports records, which comes after it in tokenizer -> records -> icot -> curriculum" in v
    assert any(x.startswith("import cycle: records -> tokenizer -> records") for x in v)
    assert broken("data.prosqa.prepare", "coconut") == ["data.prosqa.prepare (a data set) imports coconut"]
    assert broken("evaluate", "analysis") + broken("analysis", "evaluate") == []  # one way is fine
    g = {**ok, "analysis": {"evaluate"}, "evaluate": {"curriculum", "analysis"}}
    assert violations(g) == ["import cycle: analysis -> evaluate -> analysis"]
