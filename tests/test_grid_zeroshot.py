"""Comparison grid (resume, tables, report) and lm-eval zero-shot integration."""

import json
from pathlib import Path

import pytest

from conftest import tiny_model
from layerprune.cli import main


def test_grid_resumes_and_report_lists_every_run(tiny_dir, tmp_path, capsys):
    args = ["compare", str(tiny_dir), "--allocations", "uniform,dlp", "--pruners", "wanda,magnitude",
            "--sparsities", "0.5", "--nsamples", "2", "--seqlen", "64", "--ppl", "wikitext2",
            "--eval-max-windows", "2", "--out", str(tmp_path / "g"), "--quiet", "--json", "--no-cache"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["runs"] == 4 and first["skipped"] == 0
    before = (tmp_path / "g" / "results.json").read_text()
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["skipped"] == 4 and second["runs"] == 4
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert [r["key"] for r in res["runs"]] == [r["key"] for r in json.loads(before)["runs"]]
    csv = (tmp_path / "g" / "results.csv").read_text().splitlines()
    assert len(csv) == 5
    assert main(["report", str(tmp_path / "g")]) == 0
    html = (tmp_path / "g" / "report.html").read_text()
    assert html.count("<tr data-run>") == 4 + 1  # every run plus the dense row
    for r in res["runs"]:
        assert f"<td>{r['allocation']}</td><td>{r['pruner']}</td>" in html


def test_grid_refuses_other_model(tiny_dir, tmp_path, capsys, smol_tokenizer):
    other = tmp_path / "other"
    m = tiny_model("llama", vocab=len(smol_tokenizer), layers=3, seed=9)
    m.save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    base = ["--allocations", "uniform", "--pruners", "magnitude", "--sparsities", "0.5", "--ppl", "",
            "--out", str(tmp_path / "g2"), "--quiet", "--nsamples", "1", "--seqlen", "32"]
    assert main(["compare", str(tiny_dir)] + base) == 0
    capsys.readouterr()
    assert main(["compare", str(other)] + base) == 2
    assert "different model" in capsys.readouterr().err


def test_zero_shot_tiny(tiny_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from layerprune.evaluation.zeroshot import zero_shot

    m = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    r = zero_shot(m, smol_tokenizer, ["arc_easy", "boolq", "winogrande"], limit=3, batch_size=4)
    for t in ("arc_easy", "boolq", "winogrande"):
        assert 0.0 <= r["tasks"][t]["acc"] <= 1.0
        assert r["sources"][t].endswith(".jsonl")
    assert r["tasks"]["arc_easy"]["acc_norm"] is not None
    assert r["average"]["acc"] == pytest.approx(sum(r["tasks"][t]["acc"] for t in ("arc_easy", "boolq", "winogrande")) / 3)


@pytest.mark.slow
def test_zero_shot_real_smollm2_arc_easy(smol):
    from layerprune.evaluation.zeroshot import zero_shot

    model, tok = smol
    r = zero_shot(model, tok, ["arc_easy"], limit=50, batch_size=16)
    acc = r["tasks"]["arc_easy"]["acc"]
    # the data README measured 0.510 on the first 200 documents; 50 documents, ±3 stderr
    assert 0.3 <= acc <= 0.75


def test_cli_prune_quantize_finetune_chain(tiny_dir, tmp_path, capsys):
    """prune --json --out → quantize → finetune, each a layerprune output that keeps the zeros."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "p"
    assert main(["prune", str(tiny_dir), "--sparsity", "0.5", "--pruner", "wanda", "--allocation", "dlp",
                 "--nsamples", "2", "--seqlen", "64", "--eval", "wikitext2", "--eval-max-windows", "2",
                 "--out", str(out), "--json", "--quiet", "--no-cache"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["sparsity"]["target"] == 0.5 and len(rec["per_block"]) == 3 and "wikitext2" in rec["ppl"]
    assert json.loads((out / "layerprune.json").read_text())["per_block"] == rec["per_block"]
    assert main(["quantize", str(out), "--bits", "int4", "--group-size", "16", "--seqlen", "64",
                 "--eval-max-windows", "2", "--out", str(tmp_path / "q"), "--json", "--quiet"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["sparsity_after"] >= q["sparsity_before"] - 1e-12
    assert main(["finetune", str(out), "--steps", "2", "--seqlen", "32", "--batch-size", "2", "--eval-max-windows", "2",
                 "--eval-seqlen", "64", "--out", str(tmp_path / "f"), "--json", "--quiet"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert f["sparsity_after"] >= f["sparsity_before"] - 1e-12
    assert (tmp_path / "f" / "adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    assert main(["quantize", str(out), "--bits", "int3", "--out", str(tmp_path / "q3")]) == 2


def test_prune_with_quantize_and_tasks_writes_one_complete_record(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pq"
    assert main(["prune", str(tiny_dir), "--sparsity", "0.5", "--pruner", "magnitude", "--quantize", "int8",
                 "--group-size", "32", "--tasks", "arc_easy", "--limit", "2", "--eval", "wikitext2",
                 "--seqlen", "64", "--eval-max-windows", "2", "--out", str(out), "--json", "--quiet"]) == 0
    rec = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "layerprune.json").read_text())
    for r in (rec, saved):
        assert r["quantization"]["bits"] == "int8" and "wikitext2" in r["ppl_before_quantization"]
        assert 0.0 <= r["tasks"]["arc_easy"]["acc"] <= 1.0
    assert rec["sparsity"]["achieved"] >= 0.5


def test_task_data_neither_local_nor_reachable(tiny_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("LAYERPRUNE_DATA", str(empty))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = main(["eval", str(tiny_dir), "--ppl", "", "--tasks", "arc_easy", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "no local data for task(s) arc_easy" in err[-1] and "Traceback" not in "\n".join(err)


def test_grid_over_seeds_reports_mean_and_spread(tiny_dir, tmp_path, capsys):
    """--seeds runs every cell per calibration seed; tables and the report give mean ± std, figures error bars."""
    out = tmp_path / "gs"
    args = ["compare", str(tiny_dir), "--allocations", "uniform,dlp", "--pruners", "wanda", "--sparsities", "0.5",
            "--seeds", "0,1", "--nsamples", "2", "--seqlen", "64", "--ppl", "wikitext2", "--eval-max-windows", "2",
            "--out", str(out), "--quiet", "--json", "--no-cache"]
    assert main(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["runs"] == 4 and sorted(r["seed"] for r in rec["results"]) == [0, 0, 1, 1]
    md = (out / "results.md").read_text()
    assert md.count("±") == 2 and "dense" in md
    from layerprune.compare import cells

    res = json.loads((out / "results.json").read_text())
    c = next(x for x in cells(res["runs"]) if x["allocation"] == "dlp")
    vals = [r["ppl"]["wikitext2"] for r in res["runs"] if r["allocation"] == "dlp"]
    assert c["ppl"]["wikitext2"][0] == pytest.approx(sum(vals) / 2)
    assert c["ppl"]["wikitext2"][1] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert page.count("<tr data-run>") == 2 + 1 and "<h2>Settings</h2>" in page and "<figcaption>" in page
    assert "ratios_0.5" in page and "standard deviation" in page


def test_task_batch_size_reaches_lm_eval_from_prune_and_compare(tiny_dir, tmp_path, monkeypatch, capsys):
    """--task-batch-size is lm-eval's batch size in `prune` and in every `compare` cell (and its dense row)."""
    import layerprune.evaluation.zeroshot as zs

    seen, real = [], zs.zero_shot
    monkeypatch.setattr(zs, "zero_shot", lambda *a, **k: seen.append(k["batch_size"]) or real(*a, **k))
    assert main(["prune", str(tiny_dir), "--sparsity", "0.5", "--pruner", "magnitude", "--tasks", "arc_easy",
                 "--limit", "2", "--eval", "", "--seqlen", "64", "--task-batch-size", "5", "--json", "--quiet"]) == 0
    assert main(["compare", str(tiny_dir), "--allocations", "uniform", "--pruners", "magnitude", "--sparsities", "0.5",
                 "--tasks", "arc_easy", "--limit", "2", "--ppl", "", "--seqlen", "64", "--task-batch-size", "3",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 0
    assert seen == [5, 3, 3]
    capsys.readouterr()
    assert main(["compare", str(tiny_dir), "--tasks", "arc_easy", "--task-batch-size", "x", "--out",
                 str(tmp_path / "h")]) == 2
    assert "--task-batch-size must be a positive integer or auto" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--tasks", "arc_easy", "--task-batch-size", "0"]) == 2  # one rule, in EvalConfig
    assert "--task-batch-size must be a positive integer or auto" in capsys.readouterr().err


def test_quality_claims_pair_seeds_and_need_both_datasets(tmp_path):
    """bench/quality_claims.py, which backs the README's claims: "beats" only when every shared seed is lower on
    both datasets, "loses" only when every one is higher, else "mixed"; unpaired seeds are ignored."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qc", Path(__file__).parents[1] / "bench" / "quality_claims.py")
    qc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qc)

    def run(al, seed, wt, c4):
        return {"allocation": al, "pruner": "wanda", "sparsity": 0.6, "seed": seed, "ppl": {"wikitext2": wt, "c4": c4}}

    runs = [run("uniform", 0, 10, 20), run("uniform", 1, 12, 22), run("uniform", 2, 11, 21),
            run("svnup", 0, 8, 18), run("svnup", 1, 9, 19),                      # seed 2 missing: not paired
            run("owl", 0, 9, 25), run("owl", 1, 11, 21), run("owl", 2, 10, 20),   # C4 worse for seed 0: mixed
            run("dlp", 0, 13, 23), run("dlp", 1, 14, 24), run("dlp", 2, 11.5, 21.5)]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.json").write_text(json.dumps({"model": "m", "runs": runs}))
    rows = {(r["a"], r["b"]): r for r in qc.claims(qc.load(tmp_path))}
    assert rows[("svnup", "uniform")]["verdict"] == "beats" and rows[("svnup", "uniform")]["seeds"] == [0, 1]
    assert rows[("owl", "uniform")]["verdict"] == "mixed"
    assert rows[("dlp", "uniform")]["verdict"] == "loses"
    assert rows[("svnup", "uniform")]["ratio"]["wikitext2"] == pytest.approx(17 / 22)
    assert "beats in 1, loses in 0" in qc.render(list(rows.values()))

    # a grid with zero-shot tasks is judged on the mean accuracy (higher is better, every seed), not on perplexity
    def zs(al, seed, acc):
        return {"allocation": al, "pruner": "wanda", "sparsity": 0.6, "seed": seed, "ppl": {"wikitext2": 50.0},
                "zs_average": acc, "tasks": {}}

    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "results.json").write_text(json.dumps({"model": "m", "runs": [
        zs("uniform", 0, 0.40), zs("uniform", 1, 0.41), zs("svnup", 0, 0.42), zs("svnup", 1, 0.43),
        zs("dlp", 0, 0.41), zs("dlp", 1, 0.40)]}))
    grids = qc.load(tmp_path)
    assert set(grids) == {"m", "z"}                      # keyed by directory: the zero-shot grid does not replace m's
    zrows = {(r["a"], r["b"]): r for r in qc.claims({"z": grids["z"]})}
    assert {r["metric"] for r in zrows.values()} == {"zeroshot"}
    assert zrows[("svnup", "uniform")]["verdict"] == "beats"
    assert zrows[("dlp", "uniform")]["verdict"] == "mixed"
    assert zrows[("svnup", "dlp")]["verdict"] == "beats"
    assert zrows[("svnup", "uniform")]["ratio"]["zeroshot"] == pytest.approx(0.85 / 0.81)
    assert "zero-shot mean accuracy: beats in 1" in qc.render(list(zrows.values()))


def test_quality_queue_deals_slots_round_robin():
    """bench/quality_queue.py: a queue's first jobs go to different GPUs; --gpus pins a queue; no GPU, CPU slots."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qq", Path(__file__).parents[1] / "bench" / "quality_queue.py")
    qq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qq)
    assert qq.deal_slots(["0", "1"], 2) == ["0", "1", "0", "1"]
    assert qq.deal_slots(["0", "1"], 1, ["1"]) == ["1"]
    assert qq.deal_slots([], 2) == [None, None]
    with pytest.raises(SystemExit, match="names none of the GPUs"):
        qq.deal_slots(["0", "1"], 1, ["3"])
