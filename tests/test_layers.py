"""The structure: imports run down the three layers, and only the resolver reads the config."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxtrain"
CORE = ("config", "state", "step", "optim", "finetune", "precision", "sharding", "losses",
        "monitor", "evaluate", "weights", "models", "data")  # fmt: skip
RUN = ("parts", "preflight", "loop", "run", "resume", "workdir", "checkpoint", "record",
       "metrics", "sinks", "interrupt", "distributed", "throughput", "profiler", "cache", "logs",
       "cli")  # fmt: skip
TOOLS = ("sweep", "study", "space", "population", "report", "replay", "plan", "chat", "export",
         "data.convert", "data.tokenize")  # fmt: skip
# The modules that may read a ConfigDict: the config itself, its resolver, and the flag parser;
# and those that may take one, to hand it to `parts.prepare`: `train` and `Run`.
READERS = ("config", "parts", "cli")
TAKERS = ("loop", "run")
SECTIONS = {"train", "eval", "optim", "precision", "mesh", "data", "ckpt", "early_stop",
            "profile", "plateau", "init", "loss", "logging"}  # fmt: skip


def _name(path: pathlib.Path) -> str:
  return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> int | None:
  """0 core, 1 run, 2 tools: the most specific entry that names the module or a parent."""
  for depth in range(module.count(".") + 1, 0, -1):
    head = ".".join(module.split(".")[:depth])
    for i, layer in enumerate((CORE, RUN, TOOLS)):
      if head in layer:
        return i
  return None


def _modules() -> list[tuple[str, ast.Module]]:
  files = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)
  return [(_name(p), ast.parse(p.read_text())) for p in files]


def _imports(tree: ast.Module) -> list[str]:
  """The jaxtrain modules a module imports, as dotted names below `jaxtrain`."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxtrain":
      rest = node.module.split(".")[1:]
      out += [".".join([*rest, a.name]) if not rest else ".".join(rest) for a in node.names]
    elif isinstance(node, ast.Import):
      out += [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("jaxtrain.")]
  return out


def test_every_module_has_a_layer():
  assert [m for m, _ in _modules() if _layer(m) is None] == []


def test_imports_only_run_down_the_layers():
  upward = [
    f"{module} ({_layer(module)}) imports {name} ({_layer(name)})"
    for module, tree in _modules()
    for name in _imports(tree)
    if _layer(name) is not None and _layer(name) > _layer(module)
  ]
  assert upward == []


def _reads_config(tree: ast.Module, takes: bool = False) -> list[str]:
  """Where a module reads a config section (`config.train...`) or (unless it `takes` a
  config to pass on) imports ml_collections."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import | ast.ImportFrom) and not takes:
      names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
      if any(n.split(".")[0] == "ml_collections" for n in names):
        found.append(f"line {node.lineno}: imports ml_collections")
    elif isinstance(node, ast.Attribute) and node.attr in SECTIONS:
      base = node.value
      named = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
      if named in ("config", "base", "cfg"):
        found.append(f"line {node.lineno}: {named}.{node.attr}")
  return found


@pytest.mark.parametrize("layer", [CORE, RUN])
def test_only_the_resolver_reads_the_config(layer):
  readers = {
    module: found
    for module, tree in _modules()
    if _layer(module) == (CORE, RUN).index(layer) and module.split(".")[0] not in READERS
    if (found := _reads_config(tree, takes=module in TAKERS))
  }
  assert readers == {}


def test_the_check_finds_a_config_read():
  tree = ast.parse("import ml_collections\ndef f(config):\n  return config.train.steps\n")
  assert _reads_config(tree) == ["line 1: imports ml_collections", "line 3: config.train"]
  assert _layer("data.convert") == 2 and _layer("data.pipeline") == 0 and _layer("run") == 1
