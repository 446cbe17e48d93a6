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


def training_windows(tokenizer, source: str, seqlen: int, n: int, seed: int, data_dir: str | None = None) -> torch.Tensor:
    """``n`` non-overlapping ``seqlen`` windows of the source's training/calibration text, shuffled
    (cycled when the text holds fewer than ``n``)."""
    from layerprune.data.calibration import token_windows
    from layerprune.data.sources import calib_split, load_documents

    win = token_windows(tokenizer, "\n\n".join(load_documents(source, calib_split(source), data_dir)), seqlen)
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
             progress: bool = True, data_dir: str | None = None) -> tuple[nn.Module, dict]:
    """Train a LoRA adapter on the pruned ``model``; returns (peft model or merged model, record)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("fine-tuning needs peft: pip install 'layerprune[finetune]'") from None
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    targets = targets or ["q_proj", "v_proj"]
    check_targets(model, targets)
    masks = masks_of(model)
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
    data_ids = training_windows(tokenizer, data, seqlen, steps * batch_size, seed, data_dir)
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


MODES = ("separate", "merge", "masked-lora")


def finetune_dir(pruned_dir: str | Path, out: str | Path, *, steps: int = 100, lr: float = 1e-4, r: int = 8,
                 alpha: int = 16, dropout: float = 0.05, targets: list[str] | None = None, seqlen: int = 1024,
                 batch_size: int = 4, seed: int = 0, mode: str = "separate", data: str = "c4", evaluation=None,
                 device: str = "auto", progress: bool = True, trust_remote_code: bool = False,
                 data_dir: str | None = None) -> dict:
    """LoRA recovery of a pruned output directory into ``out`` (atomic), evaluated before and after.
    Every setting is checked before the model is loaded or anything is evaluated."""
    from layerprune.api import EvalConfig
    from layerprune.data.sources import SOURCES
    from layerprune.data.sources import data_dir as resolve_data_dir
    from layerprune.evaluation.audit import sparsity_audit
    from layerprune.evaluation.perplexity import evaluate_ppl
    from layerprune.export import RunDir, check_out_dir, load_pruned, load_record
    from layerprune.record import args_hash, now
    from layerprune.utils import resolve_device

    rec0 = load_record(pruned_dir)
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}")
    for name, v, lo in (("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--seqlen", seqlen, 2),
                        ("--lora-r", r, 1)):
        if v < lo:
            raise UserError(f"{name} must be at least {lo} (got {v})")
    if not (lr > 0):
        raise UserError(f"--lr must be positive (got {lr})")
    if not (0 <= dropout < 1):
        raise UserError(f"--lora-dropout must be in [0, 1) (got {dropout})")
    if data not in SOURCES:
        raise UserError(f"unknown --data '{data}': use one of {', '.join(SOURCES)}")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("fine-tuning needs peft: pip install 'layerprune[finetune]'") from None
    ev = (evaluation or EvalConfig()).validate()
    root = resolve_data_dir(data_dir)
    check_out_dir(out)
    dev = resolve_device(device)
    model, tok = load_pruned(pruned_dir, trust_remote_code)
    check_targets(model, targets or ["q_proj", "v_proj"])
    eseq = ev.seqlen or seqlen
    masks = {k: v.clone() for k, v in masks_of(model).items()}
    s0 = sparsity_audit(model)["global"]
    cfg = dict(steps=steps, lr=lr, r=r, alpha=alpha, dropout=dropout, targets=targets, seqlen=seqlen,
               batch_size=batch_size, seed=seed, mode=mode, data=data)
    run_dir = RunDir(out, args_hash({**cfg, "src": str(pruned_dir)}), model)
    try:
        before = evaluate_ppl(model, tok, list(ev.datasets), eseq, ev.max_windows, dev, data_dir=root)
        pm, rec = finetune(model, tok, steps, lr, r, alpha, dropout, targets, seqlen, batch_size, seed, mode, data,
                           dev, progress=progress, data_dir=root)
        after = evaluate_ppl(pm, tok, list(ev.datasets), eseq, ev.max_windows, dev, data_dir=root)
        out_rec = {**{k: v for k, v in rec0.items() if k != "per_linear"}, "finetune": rec, "source": str(pruned_dir),
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
                merged = evaluate_ppl(final, tok, list(ev.datasets), eseq, ev.max_windows, dev, data_dir=root)
                out_rec["ppl_merged_before_remask"] = {k: v["ppl"] for k, v in merged.items()}
            apply_masks(final, masks)  # masked-lora: a no-op up to float, the masked delta is zero there
            remasked = evaluate_ppl(final, tok, list(ev.datasets), eseq, ev.max_windows, dev, data_dir=root)
            out_rec["ppl"] = {k: v["ppl"] for k, v in remasked.items()}
        s1 = sparsity_audit(final)["global"]
        out_rec["sparsity_before"], out_rec["sparsity_after"] = s0, s1
        if s1 + 1e-12 < s0:
            raise RuntimeError(f"sparsity dropped from {s0} to {s1}: refusing to save")
        run_dir.finalize(final.to("cpu"), tok, out_rec, before_rename=hook)
    except BaseException:
        run_dir.abandon()
        raise
    out_rec["out"] = str(out)
    return {k: v for k, v in out_rec.items() if k != "blocks"}


def check_targets(model: nn.Module, targets: list[str]) -> None:
    names = list(masks_of(model))
    for t in targets:
        if not any(n.split(".")[-1] == t or n.endswith("." + t) for n in names):
            leaf = sorted({n.split(".")[-1] for n in names})
            raise UserError(f"target module '{t}' does not exist in this model: choose from {', '.join(leaf)}")
