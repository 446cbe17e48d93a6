"""The redesign's promises: one registry with typed options, no import loops, the engine owns execution,
the compare / SV-NUP cache bugs fixed, and every bad input one line with exit 2."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerprune.cli import main

ROOT = Path(__file__).resolve().parents[1] / "layerprune"


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ structure
def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of layerprune modules in one file."""
    tree = ast.parse(path.read_text())
    top, every = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("layerprune"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("layerprune")]
        every.update(names)
        if node in tree.body:
            top.update(names)
    return top, every


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_library_never_imports_the_cli_and_has_no_import_cycle():
    files = {(_module(p)): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, p in files.items():
        top, every = _imports(p)
        if not mod.startswith(("layerprune.cli", "layerprune.__main__")):
            assert not [i for i in every if i.startswith("layerprune.cli")], f"{mod} imports the CLI"
        graph[mod] = {i for i in top if i in files and i != mod}
    # module-level import graph is acyclic (a package __init__ importing its own children is fine)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if m.startswith(n + ".") and files[n].name == "__init__.py":
                continue  # a child module importing its parent package's already-set names
            if state.get(n) == 1 and not n.startswith(m + "."):
                raise AssertionError("import cycle: " + " -> ".join(stack + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_engine_knows_no_method():
    for p in (ROOT / "engine").glob("*.py"):
        _, every = _imports(p)
        assert not [i for i in every if i.startswith(("layerprune.allocation", "layerprune.pruners.wanda",
                                                      "layerprune.pruners.sparsegpt"))], p
    svnup = (ROOT / "allocation" / "svnup.py").read_text()
    for internal in ("runner.acts", "runner.args", "runner.kwargs", ".forward ="):
        assert internal not in svnup, internal


def test_every_option_is_declared_once_with_help():
    from dataclasses import fields

    from layerprune.allocation import ALLOCATORS
    from layerprune.pruners import PRUNERS

    for spec in [*ALLOCATORS.values(), *PRUNERS.values()]:
        for f in fields(spec.options):
            assert f.metadata.get("help"), (spec.name, f.name)
        assert spec.fn if hasattr(spec, "fn") else spec.cls


# ------------------------------------------------------------------ a plug-in allocator
def test_throwaway_allocator_is_one_file_and_one_registry_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """An allocator with one option, registered with the public function, gets its CLI flag, its
    validation, its cache key and its `ls` entry with no other change."""
    from layerprune.allocation import ALLOCATORS, Allocation, register_allocator
    from layerprune.allocation.common import finish
    from layerprune.options import option
    from layerprune.specs import AllocatorSpec

    # --- the "one file"
    @dataclass(frozen=True)
    class TiltOptions:
        tilt: float = option(0.0, "extra sparsity of the last block over the first", check=lambda v: 0 <= v < 0.3,
                             must="in [0, 0.3)")

    def allocate_tilt(ctx, target: float, options: TiltOptions) -> Allocation:
        n = ctx.adapter.n_blocks
        pb = [target + options.tilt * (i / (n - 1) - 0.5) for i in range(n)]
        return finish("tilt", ctx.adapter, target, per_block=pb, diagnostics={"tilt": options.tilt})

    spec = AllocatorSpec("tilt", TiltOptions, fn=allocate_tilt, needs_calibration=False, doc="a test allocator")
    # --- the "one registry line"
    monkeypatch.setitem(ALLOCATORS, "tilt", ALLOCATORS.get("tilt", spec))
    register_allocator(spec)

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    code, out, err = run(["allocate", str(tiny_dir), "--allocation", "tilt", "--tilt", "0.2", "--sparsity", "0.5",
                          "--seqlen", "32", "--device", "cpu", "--json", "--quiet"], capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["tilt"] == 0.2 and rec["per_block"][-1] - rec["per_block"][0] == pytest.approx(0.2, abs=1e-6)
    mean = sum(s * n for s, n in zip(rec["per_block"], rec["block_sizes"])) / sum(rec["block_sizes"])
    assert mean == pytest.approx(0.5)
    code, out, _ = run(["ls", "--json"], capsys)
    assert "tilt" in json.loads(out)["allocations"]
    code, _, err = run(["allocate", str(tiny_dir), "--allocation", "tilt", "--tilt", "0.5", "--seqlen", "32",
                          "--device", "cpu"], capsys)
    assert code == 2 and "--tilt must be in [0, 0.3) (got 0.5)" in err


# ------------------------------------------------------------------ the three bugs
GRID = ["--allocations", "uniform,dlp", "--pruners", "magnitude", "--sparsities", "0.5", "--nsamples", "2",
        "--seqlen", "32", "--device", "cpu", "--ppl", "wikitext2", "--eval-max-windows", "1", "--quiet", "--json"]


def test_compare_resumes_by_full_configuration_and_keeps_dlp_alpha(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "grid")
    code, o, err = run(["compare", str(tiny_dir), *GRID, "--out", out], capsys)
    assert code == 0, err
    first = json.loads(o)
    assert first["runs"] == 2 and first["skipped"] == 0
    dlp = next(r for r in first["results"] if r["allocation"] == "dlp")
    assert dlp["diagnostics"]["alpha"] == 0.15  # bug 3: DLP's alpha was dropped with AlphaPruning's dict
    # bug 1: another --alpha is another run, not a relabelled old one (uniform is unaffected by --alpha)
    code, o, err = run(["compare", str(tiny_dir), *GRID, "--alpha", "0.2", "--out", out], capsys)
    second = json.loads(o)
    assert code == 0 and second["skipped"] == 1 and second["runs"] == 3
    alphas = sorted(r["diagnostics"]["alpha"] for r in second["results"] if r["allocation"] == "dlp")
    assert alphas == [0.15, 0.2]
    # the same command again: everything is there
    code, o, _ = run(["compare", str(tiny_dir), *GRID, "--alpha", "0.2", "--out", out], capsys)
    third = json.loads(o)
    assert third["skipped"] == 2 and third["runs"] == 3


def test_svnup_cache_shared_by_allocate_and_prune_and_yes_is_not_in_it(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    common = ["--allocation", "svnup", "--sparsity", "0.6", "--window", "2", "--sv-samples", "2", "--pruner", "wanda",
              "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--json", "--quiet"]
    assert main(["allocate", str(tiny_dir), *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert "cached" not in first
    assert main(["prune", str(tiny_dir), *common, "--eval", "", "--yes"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert "cached" in rec["allocation"]["diagnostics"]  # bug 2: prune recomputed the game
    assert rec["per_block"] == pytest.approx(first["per_block"])


# ------------------------------------------------------------------ item 8: defaults that do what was asked
def test_eval_with_tasks_only_runs_only_the_tasks(tiny_dir, capsys):
    code, out, err = run(["eval", str(tiny_dir), "--tasks", "arc_easy", "--limit", "2", "--device", "cpu", "--json",
                          "--quiet"], capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["ppl"] == {} and rec["tasks"]["arc_easy"]["acc"] is not None


# ------------------------------------------------------------------ item 7: bad input, one line, exit 2
def _one_line(code: int, err: str, needle: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.startswith("layerprune: error")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def _gguf(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    return str(p)


BAD = {
    "out under a file": (lambda t: ["prune", "smollm2-135m", "--sparsity", "0.5", "--out", str(t / "f" / "o")],
                         "is a file, not a directory"),
    "random bytes .gguf": (lambda t: ["eval", _gguf(t, b"\x00\x01garbage" * 10)], "is not a GGUF file"),
    "truncated gguf": (lambda t: ["eval", _gguf(t, b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)], "could not be read as a GGUF"),
    "config malformed": (lambda t: ["ls", "--config", str(t / "bad.yaml")], "not valid YAML"),
    "config binary": (lambda t: ["ls", "--config", str(t / "bin.yaml")], "not a text file"),
    "config list value": (lambda t: ["prune", "smollm2-135m", "--config", str(t / "list.yaml")],
                          "'sparsity' must be a single value"),
    "eval batch 0": (lambda t: ["eval", "smollm2-135m", "--batch-size", "0"], "--batch-size must be at least 1"),
    "eval max-windows -3": (lambda t: ["eval", "smollm2-135m", "--max-windows", "-3"], "--max-windows must be at least 1"),
    "blocksize 0": (lambda t: ["prune", "smollm2-135m", "--sparsity", "0.5", "--pruner", "sparsegpt", "--blocksize", "0"],
                    "--blocksize must be a positive integer"),
    "blocksize with wanda": (lambda t: ["prune", "smollm2-135m", "--sparsity", "0.5", "--blocksize", "64"],
                             "--blocksize applies to --pruner sparsegpt only"),
    "sparsities abc": (lambda t: ["compare", "smollm2-135m", "--sparsities", "abc", "--out", str(t / "g")],
                       "--sparsities must be comma-separated numbers"),
    "report truncated": (lambda t: ["report", str(t / "rt")], "damaged"),
    "report no runs": (lambda t: ["report", str(t / "rn")], "holds no finished runs"),
    "argparse type": (lambda t: ["prune", "smollm2-135m", "--sparsity", "abc"], "invalid float value"),
    "unknown flag": (lambda t: ["prune", "smollm2-135m", "--nope"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    import layerprune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "f").write_text("a file")
    (tmp_path / "bad.yaml").write_text("sparsity: [0.5\n  pruner: : :")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    (tmp_path / "list.yaml").write_text("sparsity: [0.5, 0.6]\n")
    (tmp_path / "rt").mkdir()
    (tmp_path / "rt" / "results.json").write_text('{"runs": [{"allocation": "uni')
    (tmp_path / "rn").mkdir()
    (tmp_path / "rn" / "results.json").write_text('{"runs": []}')
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    args, needle = BAD[case]
    argv = args(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*") if "cache" not in p.parts)
    code, _, err = run(argv, capsys)
    _one_line(code, err, needle)
    after = sorted(p.name for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert after == before


def test_out_in_read_only_location(tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the read-only location is simulated at ``os.access``."""
    import os

    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    code, _, err = run(["prune", "smollm2-135m", "--sparsity", "0.5", "--out", str(ro / "o")], capsys)
    _one_line(code, err, "no permission to write in")
    assert list(ro.iterdir()) == []


def test_truncated_dataset_file(tiny_dir, tmp_path, capsys):
    d = tmp_path / "data" / "wikitext2"
    d.mkdir(parents=True)
    (d / "wikitext2_raw_v1_test.json").write_text('["a", "b", "trunc')
    code, _, err = run(["eval", str(tiny_dir), "--data-dir", str(tmp_path / "data"), "--seqlen", "32",
                        "--device", "cpu", "--quiet"], capsys)
    _one_line(code, err, "is damaged or not in the expected format")


def test_boolean_options_switch_both_ways_on_the_command_line():
    """A boolean option whose default is True can be switched off (``--no-FLAG``), one that is False on."""
    from layerprune.cli import options_for, parse
    from layerprune.pruners import get_pruner

    spec = get_pruner("sparsegpt")
    a = parse(["prune", "smollm2-135m", "--pruner", "sparsegpt", "--no-fused-obs", "--hessian-tf32"])
    assert options_for(spec, a) == {"fused": False, "hessian_tf32": True}
    assert options_for(spec, parse(["prune", "smollm2-135m", "--pruner", "sparsegpt"])) == {}
