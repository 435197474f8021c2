"""The shape of the source tree (docs/architecture.md): no import circles, no module a newcomer cannot read in
one sitting, and an entry point that is only parse -> preflight -> build -> fit -> finish."""

from __future__ import annotations

import ast

from support.imports import SRC, circles, import_graph, modules

MAX_MODULE_LINES = 400
MAX_ENTRY_LINES = 150
MAX_FUNCTION_LINES = 60


def test_the_import_graph_has_no_circles_counting_imports_inside_functions():
    assert circles(import_graph()) == []


def test_a_circle_is_found_even_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "scaletune"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from scaletune import a\n")
    (package / "c.py").write_text("from . import a\n")
    assert circles(import_graph(tmp_path)) == [["scaletune.a", "scaletune.b"]]


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_entry_point_is_short_and_no_function_in_it_is_long():
    path = SRC / "scaletune" / "train.py"
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_ENTRY_LINES
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert long == {}
