#!/usr/bin/env python3
"""The PyTorch + PEFT peer of bench/trainer: trains MiniLM (the same safetensors file) on the
same token batches the Rust side wrote, with the same head (mean pooling + linear), optimiser
(AdamW, no weight decay) and learning rate, and prints one JSON line of measurements.

With --vit DIR it trains transformers' Dinov2Model instead: DIR holds petl's own ViT tensors
under their Hugging Face checkpoint names and the config petl read off the ONNX file, loaded with
from_pretrained (which applies transformers' own checkpoint renames, e.g. attention.attention.query
-> attention.q_proj in transformers 5) and refused unless every key matches; it trains on the
image batches file (safetensors: pixels already normalised by petl's data path). The head is petl's ViT head: the mean over every token ([CLS] and patches) of the
final LayerNorm's output, then a linear layer. Before training it reports the largest absolute
difference between its pooled features and petl's on the first training batch.

Memory is measured exactly as on the Rust side (src/peak_rss.rs): once the model and data are
loaded, free heap is returned to the kernel (malloc_trim), the resident set VmRSS is noted and
the high-water mark VmHWM is reset (/proc/self/clear_refs); the peak training memory is VmHWM
after the last step minus that resident set.

usage: peer.py --data batches.json --model DIR --method full|lora|head --lr F --threads N
               [--rank 8 --alpha 16]
       peer.py --data batches.safetensors --vit DIR ...
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
    ap.add_argument("--model", help="MiniLM directory (text)")
    ap.add_argument("--vit", help="petl's ViT as a Dinov2Model directory (images)")
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

    transformers.logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.vit:
        backbone, hidden, num_labels, train, valid, pool, extra = load_vit(args, torch)
    else:
        backbone, hidden, num_labels, train, valid, pool, extra = load_bert(args, torch)

    class Classifier(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.classifier = torch.nn.Linear(hidden, num_labels)
            torch.nn.init.zeros_(self.classifier.bias)

        def forward(self, inputs):
            return self.classifier(pool(self.encoder, inputs))

    lora_targets = extra.pop("lora_targets")
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                          target_modules=lora_targets, bias="none")
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
    for inputs, labels in train:
        start = time.perf_counter()
        logits = model(inputs)
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
        for inputs, labels in valid:
            pred = model(inputs).argmax(-1)
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
        **extra,
        "phase_seconds": [steady_mean([p[i] for p in parts]) for i in range(3)]
        if args.phases else None,
    }))


def load_bert(args, torch):
    """MiniLM and the token batches: (backbone, width, classes, train, valid, pool, extra)."""
    from transformers import BertConfig, BertModel

    with open(args.data) as f:
        data = json.load(f)

    def batch(b):
        return ((torch.tensor(b["input_ids"], dtype=torch.long),
                 torch.tensor(b["attention_mask"], dtype=torch.long)),
                torch.tensor(b["labels"], dtype=torch.long))

    train = [batch(b) for b in data["train"]]
    valid = [batch(b) for b in data["valid"]]
    # No dropout: the Rust BERT has none, so both sides do the same arithmetic per step.
    config = BertConfig.from_pretrained(args.model, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    backbone, info = BertModel.from_pretrained(args.model, config=config, add_pooling_layer=False,
                                               output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise SystemExit(f"{args.model}/model.safetensors does not fit BertModel: {info}")

    def pool(encoder, inputs):
        ids, mask = inputs
        h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    extra = {"attention": backbone.config._attn_implementation,
             "lora_targets": ["query", "value"]}
    return backbone, config.hidden_size, data["num_labels"], train, valid, pool, extra


def load_vit(args, torch):
    """petl's ViT as a Dinov2Model and the image batches, as load_bert; extra carries the
    backbone check (max |pooled features − petl's| on the first training batch)."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    data = load_file(args.data)
    batch = int(data["batch"][0])

    def batches(pixels, labels):
        return [((pixels[i:i + batch],), labels[i:i + batch])
                for i in range(0, pixels.shape[0], batch)]

    train = batches(data["train_pixels"], data["train_labels"])
    valid = batches(data["valid_pixels"], data["valid_labels"])
    # No dropout, no drop path, no mask token: config.json says so (petl's ViT has none).
    backbone, info = Dinov2Model.from_pretrained(args.vit, output_loading_info=True)
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise SystemExit(f"{args.vit}/model.safetensors does not fit Dinov2Model: {info}")
    config = backbone.config

    def pool(encoder, inputs):
        # Mean over [CLS] and every patch token of the final LayerNorm's output, as petl's head.
        return encoder(pixel_values=inputs[0]).last_hidden_state.mean(1)

    backbone.eval()
    with torch.no_grad():
        pooled = pool(backbone, train[0][0])
    diff = (pooled - data["ours_pooled"]).abs().max().item()
    del pooled
    # petl's LoRA adapts each block's query and value: q_proj and v_proj in transformers 5
    # (query and value before it).
    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
    targets = ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]
    extra = {"attention": backbone.config._attn_implementation, "pooled_max_abs_diff": diff,
             "lora_targets": targets}
    return backbone, config.hidden_size, int(data["num_labels"][0]), train, valid, pool, extra


if __name__ == "__main__":
    main()
