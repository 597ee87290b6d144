"""The layout: no import cycles among the project's modules (tools/import_graph.py), and the graph tool itself
sees function-level imports and finds a planted cycle."""

import importlib.util

from conftest import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_project_has_no_import_cycles(capsys):
    tool = _tool()
    g = tool.graph()
    assert "minitron_nemo.config" in g and "minitron_nemo.workflows.search" in g and "recipes.prune" in g
    assert tool.cycles(g) == [], tool.cycles(g)
    assert tool.main([]) == 0
    assert "0 cycles" in capsys.readouterr().out


def test_graph_sees_function_level_imports_and_finds_a_cycle(tmp_path):
    tool = _tool()
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    from pkg.b import g\n    return g\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py", "pkg.c": tmp_path / "c.py"}
    assert tool.imports_of("pkg.a", tmp_path / "a.py", known) == {"pkg.b"}
    assert tool.cycles({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}) == [
        ["pkg.a", "pkg.b", "pkg.c"]]
    assert tool.cycles({"pkg.a": {"pkg.b"}, "pkg.b": set()}) == []
