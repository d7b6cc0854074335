#!/usr/bin/env python3
"""The PyTorch + PEFT peer of bench/trainer: trains MiniLM (the same safetensors file) on the
same token batches the Rust side wrote, with the same head (mean pooling + linear), optimiser
(AdamW, no weight decay) and learning rate, and prints one JSON line of measurements.

Memory is measured exactly as on the Rust side (src/peak_rss.rs): once the model and data are
loaded, free heap is returned to the kernel (malloc_trim), the resident set VmRSS is noted and
the high-water mark VmHWM is reset (/proc/self/clear_refs); the peak training memory is VmHWM
after the last step minus that resident set.

usage: peer.py --data batches.json --model DIR --method full|lora|head --lr F --threads N
               [--rank 8 --alpha 16]
"""
import argparse
import ctypes
import gc
import json
import math
import time


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak_rss():
    """Returns the resting VmRSS (KiB) and resets VmHWM to it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", choices=["full", "lora", "head"], required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--phases", action="store_true",
                    help="also report forward / backward / optimiser seconds")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import BertConfig, BertModel

    transformers.logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.data) as f:
        data = json.load(f)

    def batch(b):
        return (torch.tensor(b["input_ids"], dtype=torch.long),
                torch.tensor(b["attention_mask"], dtype=torch.long),
                torch.tensor(b["labels"], dtype=torch.long))

    train = [batch(b) for b in data["train"]]
    valid = [batch(b) for b in data["valid"]]
    num_labels = data["num_labels"]

    # No dropout: the Rust BERT has none, so both sides do the same arithmetic per step.
    config = BertConfig.from_pretrained(args.model, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    backbone, info = BertModel.from_pretrained(args.model, config=config, add_pooling_layer=False,
                                               output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise SystemExit(f"{args.model}/model.safetensors does not fit BertModel: {info}")
    attention = backbone.config._attn_implementation

    class Classifier(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.classifier = torch.nn.Linear(config.hidden_size, num_labels)
            torch.nn.init.zeros_(self.classifier.bias)

        def forward(self, ids, mask):
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.classifier(pooled)

    if args.method == "lora":
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                          target_modules=["query", "value"], bias="none")
        backbone = get_peft_model(backbone, lora)
    elif args.method == "head":
        # The linear probe: the backbone is frozen, only the classifier trains.
        backbone.requires_grad_(False)
    model = Classifier(backbone)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    base_kib = start_peak_rss()
    times, losses, parts = [], [], []
    for ids, mask, labels in train:
        start = time.perf_counter()
        logits = model(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        losses.append(loss.item())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = time.perf_counter()
        times.append(end - start)
        parts.append((t1 - start, t2 - t1, end - t2))
    peak_kib = rss_kib("VmHWM")

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for ids, mask, labels in valid:
            pred = model(ids, mask).argmax(-1)
            correct += (pred == labels).sum().item()
            total += labels.numel()

    def steady_mean(xs):
        xs = xs[1:] if len(xs) > 1 else xs
        return sum(xs) / len(xs)

    print(json.dumps({
        "side": "pytorch", "method": args.method, "steps": len(train),
        "trainable": trainable,
        "peak_rss_delta_bytes": (peak_kib - base_kib) * 1024,
        "step_seconds": steady_mean(times),
        "first_step_seconds": times[0],
        "final_loss": losses[-1] if losses else math.nan,
        "valid_accuracy": correct / max(total, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attention": attention,
        "phase_seconds": [steady_mean([p[i] for p in parts]) for i in range(3)]
        if args.phases else None,
    }))


if __name__ == "__main__":
    main()
