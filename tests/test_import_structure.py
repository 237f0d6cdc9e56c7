"""The package's modules import one another in one direction: cli -> conversion scripts / processing / training ->
models -> configurations -> tables that import nothing of the package. Read from the source (every `import`, also
inside functions), so a lazy import cannot hide a cycle."""

import ast
from pathlib import Path

import pytest

import transformers_mimo


PACKAGE = Path(transformers_mimo.__file__).parent

# Module -> layer; a module may import only modules of a lower layer (or, for `__init__`, anything).
LAYERS = {
    "audio_utils": 0,
    "conversion_mapping_mimo_audio": 0,
    "conversion_utils": 0,
    "generation_mimo_audio": 0,
    "quantization_mimo_audio": 0,
    "configuration_mimo_audio": 1,
    "configuration_mimo_audio_tokenizer": 1,
    "feature_extraction_mimo_audio": 1,
    "prompting_mimo_audio": 1,
    "modeling_mimo_audio": 2,
    "modeling_mimo_audio_tokenizer": 2,
    "pipelines_mimo_audio": 3,
    "processing_mimo_audio": 3,
    "training_mimo_audio": 3,
    "transcription_mimo_audio": 3,
    "convert_mimo_audio_tokenizer_to_hf": 4,
    "convert_mimo_audio_to_hf": 5,
    "trl_mimo_audio": 5,
    "cli": 6,
}


def package_imports() -> dict[str, set[str]]:
    """Module name -> the package modules it imports anywhere in its source."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .module import name
                    imported.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import module
                    imported.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("transformers_mimo."):
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(
                    alias.name.split(".")[1] for alias in node.names if alias.name.startswith("transformers_mimo.")
                )
        graph[path.stem] = imported - {path.stem}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = {module: imports for module, imports in package_imports().items() if module != "__init__"}
    done, visiting = set(), []

    def visit(module):
        if module in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(visiting[visiting.index(module) :] + [module])}")
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert {"modeling_mimo_audio", "training_mimo_audio", "cli"} <= done


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down_the_layers(module):
    graph = package_imports()
    assert module in graph, f"{module}.py is gone: update LAYERS"
    upward = sorted(imported for imported in graph[module] if LAYERS.get(imported, -1) >= LAYERS[module])
    assert upward == [], f"{module} (layer {LAYERS[module]}) imports {upward} of the same or a higher layer"


def test_models_do_not_import_training_or_conversion_scripts():
    graph = package_imports()
    for module in ("modeling_mimo_audio", "modeling_mimo_audio_tokenizer", "generation_mimo_audio"):
        assert not graph[module] & {"training_mimo_audio", "trl_mimo_audio", "processing_mimo_audio", "cli"}, module
        assert not {name for name in graph[module] if name.startswith("convert_")}, module
    assert graph["conversion_mapping_mimo_audio"] == set()
