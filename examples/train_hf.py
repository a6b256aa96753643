"""Distil a student with Hugging Face's Trainer from a cache: a collator and a compute_loss, nothing else changes.

    kd-cache run --profile demo                                     # writes ./out/demo
    python examples/train_hf.py ./out/demo --steps 20               # top-k cache: topk_kd_loss
    python examples/train_hf.py ./out/demo --max-tokens 4096        # batches of similar lengths, <= 4096 padded tokens

KDCollator pads a list of CacheDataset samples (pad_collate); KDTrainer.compute_loss runs the student and
returns kd_core.loss's loss against the batch's cache rows (top-k or sampled, whichever the cache holds), mixed
with next-token cross-entropy by --ce-weight. With --max-tokens the train loader uses TokenBatchSampler
instead of Trainer's fixed batch size. Everything else (optimizer, schedule, precision, DDP through accelerate,
checkpoints) is Trainer's own. The student's vocabulary may be wider than the teacher's (padded rows), never
narrower: the loss is told the cache's vocab_size and says so in one line.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from kd_core.dataset import CacheDataset, pad_collate
from kd_core.loss import TAILS, sampled_kd_loss, topk_kd_loss
from kd_core.samplers import TokenBatchSampler


class KDCollator:
    """list of CacheDataset samples -> one padded batch (pad_collate): input_ids, attention_mask (B, T), the cache
    rows (B, T, k) or (B, T, m), logsumexp (B, T), sample_index (B,)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pad_collate(samples, self.pad_token_id)


class KDTrainer(Trainer):
    """Trainer whose loss is the cached KD loss (plus ce_weight x next-token CE). max_tokens: token-bucketed
    batches (TokenBatchSampler over the dataset's lengths) instead of per_device_train_batch_size."""

    def __init__(self, *args, vocab_size: int, tail: str = "bucket", ce_weight: float = 0.0,
                 max_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size, self.tail, self.ce_weight, self.max_tokens = vocab_size, tail, ce_weight, max_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs["attention_mask"]  # (B, T)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=mask)
        logits = outputs.logits  # (B, T, V_student), V_student >= the teacher's vocab_size
        if "sampled_ids" in inputs:
            kd = sampled_kd_loss(logits, inputs["sampled_ids"], inputs["sampled_counts"], mask=mask,
                                 vocab_size=self.vocab_size)
        else:
            kd = topk_kd_loss(logits, inputs["topk_indices"], inputs["topk_logprobs"], mask=mask, tail=self.tail,
                              vocab_size=self.vocab_size)
        loss = (1 - self.ce_weight) * kd
        if self.ce_weight > 0:  # logits at t predict input_ids at t+1; padding ignored
            labels = inputs["input_ids"][:, 1:].masked_fill(~mask[:, 1:], -100)  # (B, T-1)
            loss = loss + self.ce_weight * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                           ignore_index=-100)
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self) -> DataLoader:
        if self.max_tokens is None:
            return super().get_train_dataloader()
        sampler = TokenBatchSampler(self.train_dataset.lengths(), self.max_tokens, seed=self.args.seed,
                                    rank=self.args.process_index, world_size=self.args.world_size,
                                    file_starts=self.train_dataset.file_starts())  # each part file opened once
        # Not through accelerate's prepare: the sampler already gives each rank its own batches, and Trainer
        # moves every batch to the device itself (_prepare_inputs).
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers)


class PrintLoss(TrainerCallback):
    """One line per logged step: `step N  loss X`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"step {state.global_step:5d}  loss {logs['loss']:.4f}", flush=True)


def build_student(vocab_size: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A small Llama; vocab_size may exceed the teacher's (padded embedding rows)."""
    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, tie_word_embeddings=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", help="an output.uri (its latest version), a version directory or a cache.h5")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="token-bucketed batches of at most this many padded tokens")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--tail", choices=TAILS, default="bucket")
    parser.add_argument("--pad-vocab-to", type=int, default=1, help="round the student's vocabulary up to a multiple")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Trainer's output_dir (default: a temporary directory)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = CacheDataset(args.cache)
    teacher_vocab = dataset.reader.vocab_size
    student_vocab = -(-teacher_vocab // args.pad_vocab_to) * args.pad_vocab_to
    student = build_student(student_vocab, args.hidden, args.layers, args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=args.out or scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
            remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )
        trainer = KDTrainer(model=student, args=training, train_dataset=dataset, data_collator=KDCollator(),
                            vocab_size=teacher_vocab, tail=args.tail, ce_weight=args.ce_weight,
                            max_tokens=args.max_tokens, callbacks=[PrintLoss()])
        result = trainer.train()
        if args.out:
            trainer.save_model(args.out)
    return 0 if math.isfinite(result.training_loss) else 1


if __name__ == "__main__":
    raise SystemExit(main())
