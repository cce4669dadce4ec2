"""The layout's rules, checked by reading the source (ast and text only: no import, no Ray, milliseconds).

- the intra-project import graph has no cycle (module-level and function-level imports alike);
- campaign-directory paths are built only in orchestrator/paths.py (CampaignPaths);
- click and the CLI module are imported only by orchestrator/cli.py: feature modules are plain libraries.

The purity of estimators/ (no ray, pyarrow, storage, orchestrator, workers or cluster import) is checked in
tests/test_estimators.py::test_estimators_stay_pure.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "workers", "estimators", "cluster")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _under_type_checking(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks: they never run, so they make no cycle."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of a project module, at any depth of the file."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _under_type_checking(tree)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return [(name, line) for name, line in out if name.split(".")[0] in PACKAGES]


def _known(name: str) -> str | None:
    """The project module an import names (the longest prefix that is a module of ours)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line of the import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, {})
        for name, line in _imports(module, path):
            target = _known(name)
            if target and target != module:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan, then a path inside)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def connect(v):  # recursion depth is bounded by the module count (~80)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    out = []
    for comp in comps:  # the shortest way back to the start, inside the component
        start = min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        out.append(path[::-1] + [start])
    return out


def _show(cycle: list[str], graph) -> str:
    return "\n    ".join(f"{a} -> {b}  ({MODULES[a].relative_to(ROOT)}:{graph[a][b]})"
                         for a, b in itertools.pairwise(cycle))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the walk did find the project
    found = cycles(graph)
    assert not found, "import cycles (module-level and function-level imports):\n  " + "\n  ".join(
        _show(c, graph) for c in found)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


# the core path may use a feature only here: the CLI runs them all, and the training-dynamics proxies
# ride along the fold (fold.py folds them, estimates_files.py writes them)
CORE_USES_FEATURE = {("orchestrator.fold", "orchestrator.features.proxies"),
                     ("orchestrator.estimates_files", "orchestrator.features.proxies")}


def test_the_rooms_import_in_one_direction():
    """workers/ runs on a Ray worker without the orchestrator; the core path does not lean on features."""
    found = []
    for module, edges in import_graph().items():
        for target, line in edges.items():
            room = target.split(".")[0]
            if module.startswith("workers.") and room in ("orchestrator", "cluster"):
                found.append(f"{module} -> {target} (line {line})")
            core = module.startswith("orchestrator.") and not module.startswith("orchestrator.features")
            if (core and module != "orchestrator.cli" and target.startswith("orchestrator.features")
                    and (module, target) not in CORE_USES_FEATURE):
                found.append(f"{module} -> {target} (line {line})")
    assert not found, "imports against the layering (docs/architecture.md):\n  " + "\n  ".join(found)


# --- campaign-directory paths are built in orchestrator/paths.py only -------------------------------------

# where a campaign-directory name or file name may be written; every other module asks CampaignPaths
# (workers/shard.py and orchestrator/plan.py need no exemption: they are handed their paths)
PATH_HOMES = {
    "orchestrator/paths.py",  # CampaignPaths: the one home
}

DIRS = {"runs", "estimates", "state", "failed", "rejected", "utility", "stale", "plan", "report", "audit",
        "compare", "export", "campaigns"}
SUFFIXES = (".parquet", ".npy", ".npz", ".why.txt")
# campaign files whose names carry no telling suffix
NAMES = {"campaign.toml", "summary.json", "plan.json", "driver.lock", "utility.lock", "results.json",
         "audit.json", "compare.json", "index.html"}
# "runs/" etc. inside any string (a message naming a directory builds its path by hand); "runs/s" is a rate
FRAGMENT = re.compile(r"(?<![\w.-])(runs|estimates|state|failed|rejected|utility|stale|plan|report)/(?!s\b)")
# calls whose string arguments are (parts of) path names
PATH_CALLS = {"joinpath", "join", "Path", "glob", "rglob", "iglob", "with_suffix", "with_name", "startswith",
              "endswith", "removeprefix", "removesuffix", "location", "open", "exists"}
# strings that look like campaign paths and are not, each with the reason
NOT_CAMPAIGN = {
    ("cluster/monitor.py", "prom_metrics_service_discovery.json"): "Ray's file, not a campaign's",
    ("cluster/monitor.py", "/tmp/ray/prom_metrics_service_discovery.json"): "Ray's file, not a campaign's",
    ("cluster/jobs.py", "campaign.toml"): "the spec staged for a job submission, in a temporary directory",
    ("orchestrator/features/utility.py", "utility/{}/r{}"): "a seed word (utility_run_id), not a path",
}
# spec files shipped in the package (resources), not campaign files
RESOURCES = {"demo.toml", "selftest.toml", ".tuned.toml"}


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _in_path_context(node, parents) -> bool:
    """Is this string an operand of `/` or `+`, or an argument of a path call?"""
    parent = parents.get(id(node))
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, (ast.Div, ast.Add)):
        return True
    if isinstance(parent, ast.Call) and node in parent.args:
        f = parent.func
        return (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in PATH_CALLS
    return False


def _template(node) -> str:
    """An f-string as text with `{}` for each value: f"influence{s}.npy" -> "influence{}.npy"."""
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def _is_path(text: str, context: bool) -> bool:
    """Does this string (or f-string template) spell a campaign-directory path or file name?

    A directory named alone in prose ("their reasons are in failed/") is vocabulary, documented in
    docs/campaign-directory.md; a directory joined to anything ("{}/utility/failed/", "state/fold.npz") or
    a file name ("memorization.parquet") is a path typed by hand."""
    if context and text in DIRS | set(SUFFIXES) | {".json", ".lock", "run-"}:
        return True
    for token in re.split(r"[\s(),;:'\"`\[\]]+", text):
        token = token.rstrip(".")
        name = token.rsplit("/", 1)[-1]
        if name in RESOURCES:
            continue
        if FRAGMENT.search(token) and not re.fullmatch(r"\w+/", token):
            return True
        if name in NAMES or name.startswith(".probe") or (name.endswith(SUFFIXES) and not name.startswith(SUFFIXES)):
            return True
    return False


def path_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    parents = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text, context = _template(node), True  # an f-string builds a name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if id(node) in in_fstring:
                continue  # judged as part of its f-string
            text, context = node.value, _in_path_context(node, parents)
        else:
            continue
        if _is_path(text, context):
            found.append((node.lineno, text))
    return sorted(set(found))


def test_campaign_paths_are_built_only_in_campaign_paths():
    found = []
    for pkg in ("orchestrator", "workers", "cluster"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in PATH_HOMES:
                found += [f"{rel}:{line}: {text!r}" for line, text in path_literals(path)
                          if (rel, text) not in NOT_CAMPAIGN]
    assert not found, ("campaign-directory names built outside orchestrator/paths.py (add a CampaignPaths "
                       "property or method and use it):\n  " + "\n  ".join(found))


def test_the_path_gate_sees_hand_built_paths(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""docstring: runs/ and memorization.parquet are fine here."""\n'
                   'def f(root, run, s, p):\n'
                   '    a = root / "runs"\n'                       # 3
                   '    b = root / f"influence{s}.npy"\n'          # 4
                   '    c = p.name.endswith(".json")\n'             # 5
                   '    d = f"see {root}/failed/ for why"\n'     # 6
                   '    d = "their reasons are in failed/."\n'   # a directory named in prose
                   '    e = {"runs": 1}["runs"]\n'                # a key, not a path
                   '    g = f"{run} runs/s"\n'                    # a rate, not a path
                   '    h = p.suffix == ".parquet"\n'             # a user file\'s type, not a campaign path
                   '    return "no summary.json (state/fold.npz)"\n')  # 11
    assert [line for line, _ in path_literals(src)] == [3, 4, 5, 6, 11]


# --- click and the CLI module stay in orchestrator/cli.py -------------------------------------------------

def test_only_the_cli_imports_click_or_the_cli():
    found = []
    for module, path in MODULES.items():
        if module == "orchestrator.cli":
            continue
        for name, line in _imports(module, path) + _third_party(path):
            if name == "click" or name.startswith("click.") or _known(name) == "orchestrator.cli":
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    assert not found, "click commands live in orchestrator/cli.py only:\n  " + "\n  ".join(found)


def _third_party(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.module, node.lineno))
    return [(n, line) for n, line in out if n.split(".")[0] not in PACKAGES]
