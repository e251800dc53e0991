"""Does the bf16x2 GEMV's rounding change what the draft proposes? CPU, no GPU needed.

    python benchmarks/gemv_precision.py [--model DIR] [--tokens 512] [--out benchmarks/results]

The model (default: the embedded SmolLM2-135M-Instruct) runs in bf16 in transformers, teacher-forced over
the first --tokens tokens of each of bench_e2e's real files. Three versions of it: the target (bf16
weights) and two drafts whose decoder linears are int4 (the plugin's RTN, draft_weights.quantize_w4, the
group size QuantSpec would pick), computed either as the fp32 GEMV does (x @ dequantize(w4).T in fp32) or
in the bf16x2 GEMV's arithmetic (draft_weights.bf16x2_linear). Embeddings, norms and the lm_head are the
target's, as in QuantSpec's draft. Per file: how often each draft's next-token argmax equals the target's
(greedy QuantSpec accepts a draft token exactly then, given the same prefix) and how often the two drafts'
argmaxes differ. Not measured here: the draft's INT4 KV cache (all three read full-precision K/V), so the
agreement is not QuantSpec's acceptance, only the GEMV arithmetic's share in it.
"""

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import REAL_FILES, real_prompts  # noqa: E402
from vllm_quantspec.draft_weights import bf16x2_linear, dequantize, quantize_w4  # noqa: E402
from vllm_quantspec.options import fitting_weight_groups  # noqa: E402

CHUNK = 16  # tokens a bf16x2 call: its lanes tensor is tokens x N x K/4 floats


class Int4Linear(torch.nn.Module):
    """A decoder linear of the draft: RTN int4 weights, computed as the fp32 or the bf16x2 GEMV does."""

    def __init__(self, linear: torch.nn.Linear, group: int, bf16x2: bool):
        super().__init__()
        assert linear.bias is None
        self.w4 = quantize_w4(linear.weight.data.float(), group, scale_dtype=torch.bfloat16)
        self.weight = dequantize(self.w4)
        self.bf16x2 = bf16x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.bf16x2:
            y = torch.cat([bf16x2_linear(c, self.w4) for c in flat.split(CHUNK)])
        else:
            y = (flat.float() @ self.weight.T).to(x.dtype)
        return y.view(*x.shape[:-1], -1)


def draft_of(target: torch.nn.Module, group: int, bf16x2: bool) -> torch.nn.Module:
    draft = copy.deepcopy(target)
    for layer in draft.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int4Linear(child, group, bf16x2))
    return draft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.model is None:
        from vllm_quantspec.embedded_model import embedded_model_path

        args.model = embedded_model_path()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    cfg = target.config
    group = max(fitting_weight_groups(cfg, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)[1])
    models = {"target": target, "draft_fp32": draft_of(target, group, False), "draft_bf16x2": draft_of(target, group, True)}
    head = dict(device="cpu", torch=torch.__version__, command="python " + " ".join(sys.argv),
                date=datetime.date.today().isoformat(), model=os.path.basename(os.path.normpath(args.model)),
                tokens=args.tokens, weight_group=group)
    print(json.dumps(head), flush=True)
    rows = []
    for rel, ids in real_prompts(args.model, args.tokens).items():
        t0 = time.time()
        with torch.no_grad():
            top = {name: m(torch.tensor([ids])).logits[0].argmax(-1) for name, m in models.items()}
        fp32_right, bf16x2_right = top["draft_fp32"] == top["target"], top["draft_bf16x2"] == top["target"]
        row = dict(file=rel, positions=len(ids),
                   fp32_vs_target=round(fp32_right.float().mean().item(), 4),
                   bf16x2_vs_target=round(bf16x2_right.float().mean().item(), 4),
                   drafts_differ=round((top["draft_fp32"] != top["draft_bf16x2"]).float().mean().item(), 4),
                   # positions only one draft gets right: their difference is the agreement's (a sign test's counts)
                   only_fp32_right=int((fp32_right & ~bf16x2_right).sum()),
                   only_bf16x2_right=int((bf16x2_right & ~fp32_right).sum()))
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    lines = [f"# The bf16x2 GEMV's rounding and the draft's proposals, {head['model']} bf16, CPU",
             "", f"`{head['command']}` ({head['date']}, torch {head['torch']}). Teacher-forced over the first "
             f"{args.tokens} tokens of each file; int4 group {group}; all versions read full-precision K/V "
             "(the draft's INT4 KV cache is not modelled). Share of positions where the draft's next-token argmax "
             "equals the target's, and where the two drafts' argmaxes differ.", "",
             "| file | draft, fp32 GEMV arithmetic = target | draft, bf16x2 = target | drafts differ | only fp32 right "
             "| only bf16x2 right |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['fp32_vs_target']:.4f} | {r['bf16x2_vs_target']:.4f} | {r['drafts_differ']:.4f} | "
              f"{r['only_fp32_right']} | {r['only_bf16x2_right']} |" for r in rows]
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("fp32_vs_target", "bf16x2_vs_target", "drafts_differ")}
    total = {key: sum(r[key] for r in rows) for key in ("only_fp32_right", "only_bf16x2_right")}
    lines.append(f"| mean / total | {mean['fp32_vs_target']:.4f} | {mean['bf16x2_vs_target']:.4f} | "
                 f"{mean['drafts_differ']:.4f} | {total['only_fp32_right']} | {total['only_bf16x2_right']} |")
    print("\n".join(lines))
    stem = os.path.join(args.out, f"gemv-precision-{head['model'].split('-instruct')[0]}-cpu")
    json.dump(dict(head, rows=rows), open(stem + ".json", "w"), indent=1)
    open(stem + ".md", "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
