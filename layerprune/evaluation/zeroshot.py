"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (the optional ``eval`` extra).

The in-memory model object is wrapped in ``HFLM`` (never re-loaded from disk, so a pruned model is
what gets scored — the released DLP code silently scored the dense checkpoint without a save path).
Task definitions are the stock lm-eval YAMLs, included by absolute path, with the dataset pointed at
the local files of the data directory (``zeroshot/``) when it has them, else at the hub.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from layerprune.data.sources import data_dir
from layerprune.errors import UserError

log = logging.getLogger("layerprune")

# task -> (stock yaml under lm_eval/tasks, split scored, local file)
TASKS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "test", "zeroshot/arc_easy_test.jsonl"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "zeroshot/arc_challenge_test.jsonl"),
    "boolq": ("super_glue/boolq/default.yaml", "validation", "zeroshot/boolq_validation.jsonl"),
    "piqa": ("piqa/piqa.yaml", "validation", "zeroshot/piqa_validation.jsonl"),
    "winogrande": ("winogrande/default.yaml", "validation", "zeroshot/winogrande_validation.jsonl"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", "zeroshot/openbookqa_test.jsonl"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "zeroshot/hellaswag_validation.jsonl.gz"),
    "rte": ("glue/rte/default.yaml", "validation", "zeroshot/rte_validation.jsonl"),
}
PAPER_SEVEN = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def check_tasks(names: list[str]) -> None:
    for t in names:
        if t not in TASKS:
            raise UserError(f"unknown task '{t}': use any of {', '.join(TASKS)}")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("zero-shot evaluation needs lm-eval: pip install 'layerprune[eval]'") from None


def write_task_dir(names: list[str], root: str | Path | None = None) -> tuple[Path, dict[str, str]]:
    """YAMLs that include the stock task and read the local file; returns (dir, task -> source)."""
    import lm_eval.tasks

    stock = Path(os.path.dirname(lm_eval.tasks.__file__))
    d = Path(tempfile.mkdtemp(prefix="layerprune-tasks-"))
    root = data_dir(root)
    sources = {}
    for t in names:
        yml, split, rel = TASKS[t]
        lines = [f"include: {stock / yml}", f"task: {t}"]
        local = (root / rel) if root is not None else None
        if local is not None and local.is_file():
            lines += ["dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
                      f"    {split}: {local.resolve()}", "training_split: null"]
            lines += ["validation_split: null", "test_split: test"] if split == "test" else \
                     ["validation_split: validation", "test_split: null"]
            sources[t] = str(local)
        else:
            sources[t] = "hub"
        (d / f"{t}.yaml").write_text("\n".join(lines) + "\n")
    return d, sources


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int | str = 16,
              device: torch.device | str = "cpu", num_fewshot: int = 0, data_dir: str | Path | None = None) -> dict:
    """Score ``tasks``; returns ``{"tasks": {t: {"acc", "acc_norm"}}, "average": ..., "sources": ...}``.

    Tasks with a local file read it (no network); the others go to the hub unless the process runs with
    ``HF_DATASETS_OFFLINE=1``, in which case they are refused with one line. Nothing here changes the
    process environment."""
    check_tasks(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model.to(device)
    tdir, sources = write_task_dir(tasks, data_dir)
    if any(v == "hub" for v in sources.values()) and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        missing = [t for t, v in sources.items() if v == "hub"]
        raise UserError(f"no local data for task(s) {', '.join(missing)} and the hub is off: add them to the data directory")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=str(tdir), include_defaults=False)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                                      log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0, bootstrap_iters=0)
    except Exception as e:  # noqa: BLE001 - dataset problems reach the user as one line
        if "offline" in str(e).lower() or "connect" in str(e).lower():
            raise UserError(f"a task's data is neither local nor reachable: {str(e).splitlines()[0][:160]}") from None
        raise
    out: dict[str, dict] = {}
    for t in tasks:
        r = res["results"].get(t, {})
        out[t] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"),
                  "acc_stderr": r.get("acc_stderr,none"), "n": res.get("n-samples", {}).get(t, {}).get("effective")}
    seven = [t for t in PAPER_SEVEN if t in out and out[t]["acc"] is not None]
    avg = {"metric": "acc (unweighted mean over the papers' seven tasks present)",
           "tasks": seven,
           "acc": sum(out[t]["acc"] for t in seven) / len(seven) if seven else None,
           "acc_norm_where_available": (sum((out[t]["acc_norm"] if out[t]["acc_norm"] is not None else out[t]["acc"])
                                            for t in seven) / len(seven)) if seven else None}
    return {"tasks": out, "average": avg, "sources": sources, "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "versions": {t: res.get("versions", {}).get(t) for t in tasks}}
