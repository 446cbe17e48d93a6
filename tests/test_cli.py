import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerprune.cli import main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,needle", [
    (["eval", "no-such-model"], "unknown model"),
    (["eval", "org/none", "--ppl", "nope"], "unknown dataset"),
    (["prune", "smollm2-135m", "--sparsity", "1.2"], "sparsity must be in [0, 1)"),
    (["prune", "smollm2-135m", "--pattern", "4:2"], "N:M"),
    (["prune", "smollm2-135m", "--sparsity", "0.5", "--pruner", "bogus"], "unknown pruner"),
    (["prune", "smollm2-135m", "--sparsity", "0.5", "--allocation", "bogus"], "unknown allocation"),
    (["prune", "smollm2-135m", "--sparsity", "0.5", "--nsamples", "0"], "nsamples"),
    (["prune", "smollm2-135m", "--pattern", "2:4", "--allocation", "svnup"], "N:M patterns work with"),
    (["allocate", "smollm2-135m", "--allocation", "dlp", "--alpha", "0.9", "--nsamples", "1"], "alpha"),
    (["eval", "smollm2-135m", "--tasks", "nope"], "unknown task"),
    (["bench-decode", "some-dir", "--prefill-tokens", "2k"], "--prefill-tokens must be comma-separated integers"),
    (["bench-decode", "some-dir", "--prefill-tokens", "512,0"], "--prefill-tokens must be positive"),
])
def test_bad_input_one_line_exit_2(args, needle, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("layerprune: error")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_out_exists(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("1")
    code, _, err = run(["prune", "smollm2-135m", "--sparsity", "0.5", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not empty" in err


def test_dir_without_model(tmp_path, capsys):
    code, _, err = run(["eval", str(tmp_path)], capsys)
    assert code == 2 and "config.json" in err


def test_ls_json(capsys):
    code, out, _ = run(["ls", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and "smollm2-135m" in d["models"] and "dlp" in d["allocations"]


def test_console_script_json_only_stdout():
    p = subprocess.run([sys.executable, "-m", "layerprune", "ls", "--json"], capture_output=True, text=True)
    assert p.returncode == 0
    json.loads(p.stdout)  # exactly one JSON object


def test_process_entry_point_keeps_exit_codes_and_flushes_output(tmp_path):
    """``python -m layerprune`` ends with a fast exit (no interpreter teardown): the exit code of bad input
    (2, one line) and a complete JSON record on stdout must still come through; a file target is written."""
    p = subprocess.run([sys.executable, "-m", "layerprune", "prune", "no-such-model", "--sparsity", "0.5"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("layerprune: error:") and p.stdout == ""
    p = subprocess.run([sys.executable, "-m", "layerprune.cli", "ls", "--json"], capture_output=True, text=True)
    assert p.returncode == 0 and "smollm2-135m" in json.loads(p.stdout)["models"]
    from layerprune.cli import _has_children

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert _has_children() or not Path("/proc/self/task").is_dir()  # a live child: exit the normal way
    finally:
        child.kill()
        child.wait()


def test_run_record_times_the_fixed_costs(tiny_dir):
    """The record of a CLI run says where the fixed time went: start-up before the call (imports, arguments),
    calibration sampling, weight hashing, and where the weights were loaded; each inside the whole."""
    p = subprocess.run([sys.executable, "-m", "layerprune", "prune", str(tiny_dir), "--sparsity", "0.5", "--pruner",
                        "wanda", "--allocation", "dlp", "--nsamples", "2", "--seqlen", "32", "--eval", "", "--json",
                        "--quiet", "--device", "cpu", "--no-cache"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-800:]
    rec = json.loads(p.stdout)
    tm = rec["timing"]
    split = rec["allocation"]["diagnostics"]["dense_stats_split"]  # the DLP statistics pass, by part
    assert {"capture_s", "forwards_s", "on_block_s"} <= set(split)
    assert split["capture_s"] + split["forwards_s"] + split["on_block_s"] <= split["seconds"] <= tm["allocation_seconds"]
    assert rec["fused_kernels"] == {}  # the fused norm / rotary kernels serve the GPU only
    assert tm["loaded_on"] == "cpu"
    assert 0 < tm["startup_seconds"] < 120
    assert 0 < tm["calibration_seconds"] <= tm["total_seconds"]
    assert 0 < tm["weights_hash_seconds"] <= tm["total_seconds"]
    assert tm["load_seconds"] + tm["allocation_seconds"] + tm["prune_seconds"] <= tm["total_seconds"]


def test_prune_eval_batch_size_gives_the_same_perplexity(tiny_dir, capsys):
    """--eval-batch-size batches the perplexity windows: the same perplexity (float rounding aside); 0 is refused
    with one line and exit code 2 before any work."""
    from layerprune.cli import main

    base = ["prune", str(tiny_dir), "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32", "--eval-max-windows", "5",
            "--json", "--quiet", "--device", "cpu", "--no-cache"]
    ppl = {}
    for bs in ("1", "3"):
        assert main(base + ["--eval-batch-size", bs]) == 0
        rec = json.loads(capsys.readouterr().out)
        ppl[bs] = rec["ppl"]["wikitext2"]
        assert rec["ppl_details"]["wikitext2"]["windows"] == 5
    assert ppl["3"] == pytest.approx(ppl["1"], rel=1e-5)
    assert main(base + ["--eval-batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-batch-size must be at least 1" in err[0]


@pytest.mark.parametrize("cmd", ["prune", "allocate", "eval", "compare", "report", "finetune", "quantize", "export",
                                 "generate", "bench-decode", "ls"])
def test_every_command_prints_its_help(cmd, capsys):
    """A '%' in an option's help once made argparse fail on `layerprune prune --help`."""
    assert main([cmd, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out
