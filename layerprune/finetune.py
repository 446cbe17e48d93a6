"""LoRA recovery fine-tuning that keeps the sparsity (peft; the optional ``finetune`` extra).

Recipe defaults follow the Wanda/OWL/AlphaPruning ``lora_ft`` scripts: r 8, alpha 16, dropout 0.05,
targets q_proj and v_proj, lr 1e-4, causal-LM loss on C4 text (methods_dlp.md §1.9). Three modes:

* ``separate`` (default): the sparse base is frozen and saved untouched; the dense adapter is saved
  next to it in peft's format (``adapter/``). Evaluation runs with the adapter attached.
* ``merge``: merge W + s·BA, then re-apply the mask; the record reports the perplexity before and
  after re-masking (the cost of destroying the adapter's update on pruned positions).
* ``masked-lora``: the adapter's update is itself masked, ΔW = (s·BA) ⊙ M, during training, so the
  merge keeps every zero exactly (the SparsePEFT idea, arXiv 2410.03750).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.errors import UserError

log = logging.getLogger("layerprune")


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    from layerprune.models.adapter import ModelAdapter

    ad = ModelAdapter.of(model)
    return {ad.full_name(i, n): (lin.weight.data != 0) for i, n, lin in ad.all_linears()}


def training_windows(tokenizer, source: str, seqlen: int, n: int, seed: int) -> torch.Tensor:
    """``n`` non-overlapping ``seqlen`` windows of the source's training/calibration text, shuffled
    (cycled when the text holds fewer than ``n``)."""
    from layerprune.data.calibration import token_windows
    from layerprune.data.sources import calib_split, load_documents

    win = token_windows(tokenizer, "\n\n".join(load_documents(source, calib_split(source))), seqlen)
    order = list(range(win.shape[0]))
    random.Random(seed).shuffle(order)
    return win[order].repeat(math.ceil(n / len(order)), 1)[:n]


def _mask_lora_forward(layer: nn.Module, mask: torch.Tensor, adapter: str = "default") -> None:
    """Make a peft LoRA Linear compute base(x) + x·((s·B·A) ⊙ M)ᵀ."""
    import torch.nn.functional as F

    def forward(x, *args, **kwargs):
        base = layer.base_layer(x)
        A = layer.lora_A[adapter].weight
        B = layer.lora_B[adapter].weight
        delta = (B @ A) * layer.scaling[adapter] * mask.to(A.dtype)
        return base + F.linear(layer.lora_dropout[adapter](x).to(A.dtype), delta).to(base.dtype)

    layer.forward = forward


def finetune(model: nn.Module, tokenizer, steps: int = 100, lr: float = 1e-4, r: int = 8, alpha: int = 16,
             dropout: float = 0.05, targets: list[str] | None = None, seqlen: int = 1024, batch_size: int = 4,
             seed: int = 0, mode: str = "separate", data: str = "c4", device: torch.device | str = "cpu",
             progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a LoRA adapter on the pruned ``model``; returns (peft model or merged model, record)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("fine-tuning needs peft: pip install 'layerprune[finetune]'") from None
    if mode not in ("separate", "merge", "masked-lora"):
        raise UserError("--mode must be separate, merge or masked-lora")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    targets = targets or ["q_proj", "v_proj"]
    masks = masks_of(model)
    names = list(masks)
    for t in targets:
        if not any(n.split(".")[-1] == t or n.endswith("." + t) for n in names):
            leaf = sorted({n.split(".")[-1] for n in names})
            raise UserError(f"target module '{t}' does not exist in this model: choose from {', '.join(leaf)}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    if mode == "masked-lora":
        from peft.tuners.lora import Linear as LoraLinear

        for name, mod in pm.named_modules():
            if isinstance(mod, LoraLinear):
                key = next(k for k in masks if name.endswith(k))
                _mask_lora_forward(mod, masks[key].to(mod.base_layer.weight.device))
    pm.to(device)
    pm.train()
    data_ids = training_windows(tokenizer, data, seqlen, steps * batch_size, seed)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    t = time.perf_counter()
    bar = tqdm(range(steps), desc="LoRA", disable=not progress)
    for s in bar:
        batch = data_ids[s * batch_size : (s + 1) * batch_size].to(device)
        out = pm(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    pm.eval()
    rec = {"mode": mode, "steps": steps, "batch_size": batch_size, "seqlen": seqlen, "tokens": steps * batch_size * seqlen,
           "lr": lr, "r": r, "alpha": alpha, "dropout": dropout, "targets": targets, "data": data, "seed": seed,
           "loss_first": losses[0], "loss_last": losses[-1],
           "loss_first5_mean": sum(losses[:5]) / len(losses[:5]), "loss_last5_mean": sum(losses[-5:]) / len(losses[-5:]), "losses": losses, "seconds": time.perf_counter() - t,
           "trainable_params": sum(p.numel() for p in pm.parameters() if p.requires_grad)}
    return pm, rec


@torch.no_grad()
def merge_keep_mask(pm: nn.Module, masks: dict[str, torch.Tensor], mode: str) -> nn.Module:
    """Merge the adapter; for ``merge`` re-apply the mask afterwards (``masked-lora`` keeps it exactly)."""
    if mode == "masked-lora":
        from peft.tuners.lora import Linear as LoraLinear

        for name, mod in pm.named_modules():  # merge the masked delta by hand (peft would merge B·A unmasked)
            if isinstance(mod, LoraLinear):
                key = next(k for k in masks if name.endswith(k))
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                mod.base_layer.weight.data += ((B @ A) * mod.scaling["default"] * masks[key].to(A.device)).to(mod.base_layer.weight.dtype)
        model = pm.unload()
    else:
        model = pm.merge_and_unload()
    return model


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    for n, m in masks.items():
        mods[n].weight.data *= m.to(mods[n].weight.device, mods[n].weight.dtype)


def cmd_finetune(a: argparse.Namespace) -> tuple[dict, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.api import check_datasets, evaluate_ppl
    from layerprune.cli import _csv, table
    from layerprune.evaluation.audit import sparsity_audit
    from layerprune.export import RunDir, load_record
    from layerprune.record import args_hash, now
    from layerprune.utils import resolve_device

    rec0 = load_record(a.pruned_dir)
    mode = "merge" if a.merge else "masked-lora" if a.masked_lora else a.mode
    evals = check_datasets(_csv(a.eval))
    run_dir = RunDir(a.out, args_hash(vars(a)))
    dev = resolve_device(a.device)
    model = AutoModelForCausalLM.from_pretrained(a.pruned_dir, dtype=torch.float32, trust_remote_code=a.trust_remote_code).eval()
    tok = AutoTokenizer.from_pretrained(a.pruned_dir)
    seqlen = a.eval_seqlen or a.seqlen
    masks = {k: v.clone() for k, v in masks_of(model).items()}
    s0 = sparsity_audit(model)["global"]
    before = evaluate_ppl(model, tok, evals, seqlen, a.eval_max_windows, dev)
    pm, rec = finetune(model, tok, a.steps, a.lr, a.lora_r, a.lora_alpha, a.lora_dropout, _csv(a.targets), a.seqlen,
                       a.batch_size, a.seed, mode, a.data, dev, progress=not a.quiet)
    after = evaluate_ppl(pm, tok, evals, seqlen, a.eval_max_windows, dev)
    out_rec = {**{k: v for k, v in rec0.items() if k != "per_linear"}, "finetune": rec, "source": str(a.pruned_dir),
               "finetuned": now(), "ppl_before_finetune": {k: v["ppl"] for k, v in before.items()},
               "ppl_with_adapter": {k: v["ppl"] for k, v in after.items()}}
    hook = None
    if mode == "separate":
        adapter_tmp = run_dir.partial / "adapter"
        pm.save_pretrained(adapter_tmp)
        out_rec["adapter"] = "adapter/ (peft format; load with PeftModel.from_pretrained(base, DIR/adapter))"

        def hook(final_dir: Path) -> None:
            shutil.move(str(adapter_tmp), str(final_dir / "adapter"))

        final = pm.unload()  # the untouched sparse base
        out_rec["ppl"] = out_rec["ppl_with_adapter"]
    else:
        final = merge_keep_mask(pm, masks, mode)
        if mode == "merge":
            merged = evaluate_ppl(final, tok, evals, seqlen, a.eval_max_windows, dev)
            out_rec["ppl_merged_before_remask"] = {k: v["ppl"] for k, v in merged.items()}
            apply_masks(final, masks)
        else:
            apply_masks(final, masks)  # no-op up to float: the masked delta is exactly zero there
        remasked = evaluate_ppl(final, tok, evals, seqlen, a.eval_max_windows, dev)
        out_rec["ppl"] = {k: v["ppl"] for k, v in remasked.items()}
    s1 = sparsity_audit(final)["global"]
    out_rec["sparsity_before"], out_rec["sparsity_after"] = s0, s1
    if s1 + 1e-12 < s0:
        raise RuntimeError(f"sparsity dropped from {s0} to {s1}: refusing to save")
    out = run_dir.finalize(final.to("cpu"), tok, out_rec, before_rename=hook)
    rows = [["pruned", s0] + [v["ppl"] for v in before.values()],
            [f"+ LoRA ({mode}, {a.steps} steps)", s1] + list(out_rec["ppl"].values())]
    txt = table(["model", "sparsity"] + [f"ppl {k}" for k in evals], rows)
    txt += f"\nloss (mean of 5 steps) {rec['loss_first5_mean']:.3f} → {rec['loss_last5_mean']:.3f} over {rec['tokens']} tokens; saved to {out}"
    return {k: v for k, v in out_rec.items() if k != "blocks"}, txt
