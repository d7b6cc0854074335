#!/usr/bin/env python3
"""Loads a petl adapter the way a PyTorch user would, runs it, and compares its logits with petl's.

The load is the one docs/trainer.md documents ("Loading an adapter in PyTorch"):
  * LoRA (`peft_type: LORA`, `task_type: FEATURE_EXTRACTION`):
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter_dir)
  * full, bitfit (petl's safetensors layout; BertModel's own tensor names):
        model = AutoModel.from_pretrained(base); model.load_state_dict(weights, strict=False)
  * head (the linear probe): the base AutoModel as it is (its weights file is empty);
then, for every method, petl's head from head.safetensors on the mean of the last hidden state
over real tokens. LST has no PyTorch implementation: this script refuses it.

Inputs (--inputs, JSON written by the Rust test): {"input_ids": [[...]], "attention_mask":
[[...]], "logits": [[...]]}, petl's own logits for those rows. Prints one JSON line with the
largest absolute logit difference, the same for the base model without the adapter's backbone
tensors (the control: it shows the adapter is really applied), and the share of rows whose
predicted class agrees; exits 1 when the difference exceeds --tolerance.

usage: check.py --adapter DIR --base DIR --inputs FILE [--tolerance 1e-4]
"""
import argparse
import json
import os
import sys


def load_backbone(adapter, base, config):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    method = config.get("petl_method")
    if method == "lst":
        raise SystemExit("check.py: an LST adapter is a side network petl runs itself; "
                         "no PyTorch model computes it (load it with petl's export::read_adapter)")
    # No dropout, so the forward is deterministic (eval() also turns it off; this is belt and braces).
    model = AutoModel.from_pretrained(base, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if config.get("peft_type") == "LORA":
        from peft import PeftModel

        if config.get("task_type") != "FEATURE_EXTRACTION":
            raise SystemExit(f"check.py: expected task_type FEATURE_EXTRACTION, got {config.get('task_type')}")
        model = PeftModel.from_pretrained(model, adapter)
    else:
        weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise SystemExit(f"check.py: tensors that {type(model).__name__} does not have: "
                             f"{result.unexpected_keys[:5]}")
        untouched = len(result.missing_keys)
        print(f"check.py: {method}: {len(weights)} tensors loaded into {type(model).__name__}, "
              f"{untouched} left as in the base model", file=sys.stderr)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        config = json.load(f)
    head_info = config.get("petl_head") or {}
    if head_info.get("pooling") != "mean":
        raise SystemExit(f"check.py: expected petl_head.pooling 'mean', got {head_info!r}")
    with open(args.inputs) as f:
        inputs = json.load(f)

    head = load_file(os.path.join(args.adapter, head_info["weights"]))
    ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
    mask = torch.tensor(inputs["attention_mask"], dtype=torch.long)

    def logits_of(model):
        model.eval()
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return pooled @ head["classifier.weight"].T + head["classifier.bias"]

    logits = logits_of(load_backbone(args.adapter, args.base, config))
    ours = torch.tensor(inputs["logits"], dtype=logits.dtype)
    diff = (logits - ours).abs().max().item()
    # The control: the base model without the adapter's backbone tensors, same head. When the
    # adapter changes the backbone, this must differ from petl's logits by far more than the
    # tolerance, or the comparison above proves nothing about the adapter being applied.
    from transformers import AutoModel
    base_only = AutoModel.from_pretrained(args.base, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0)
    diff_without_adapter = (logits_of(base_only) - ours).abs().max().item()
    agree = (logits.argmax(-1) == ours.argmax(-1)).float().mean().item()
    ok = diff <= args.tolerance
    print(json.dumps({
        "method": config.get("petl_method"),
        "rows": int(ids.shape[0]),
        "max_abs_diff": diff,
        "max_abs_diff_without_adapter": diff_without_adapter,
        "argmax_agreement": agree,
        "tolerance": args.tolerance,
        "ok": ok,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
