"""Stage: masked-LM pretraining of a RoBERTa-style encoder on unlabelled C functions, in a Ray Train TorchTrainer
running DeepSpeed ZeRO (as distillation does). Experts with `source: pretrain` start from it.

The corpus is the training split's functions (labels unused) plus `pretrain.extra_corpus`, less any function whose
whitespace-normalised text equals a validation or test function. A BPE tokenizer is trained on it; each epoch masks
every function anew (RoBERTa's dynamic masking, seeded by (seed, epoch, row), so a resumed run masks as an
uninterrupted one would); a held-out slice gives the masked-LM loss and masked-token accuracy per epoch.

The encoder (config.json + model.safetensors) and its tokenizer land in
<output_dir>/pretrain/pretrain-<digest>/encoder, the digest covering the pretraining settings, the data and the
seed: a second run with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset
from transformers import RobertaForMaskedLM

from moekd_ray import progress, ray_runtime, tracking
from moekd_ray.c_parser import extract_functions
from moekd_ray.config import MoEKDConfig, PretrainedConfig, PretrainSource
from moekd_ray.data import load_devign
from moekd_ray.errors import ConfigError
from moekd_ray.models import roberta_config
from moekd_ray.deepspeed_engine import (DEEPSPEED_TAG, DeepSpeedJob, deepspeed_config, deepspeed_step, gathered_state,
                                       save_deepspeed, start_deepspeed)
from moekd_ray.tokenization import SPECIALS, encode, train_bpe
from moekd_ray.train_loop import BestEpoch, model_device, model_inputs, start_epoch, train_epoch, trim_padding

ENCODER_DIR = "encoder"
IGNORE = -100  # label of a token that is not predicted


def pretrain_digest(cfg: MoEKDConfig) -> str:
    """What the encoder depends on: the pretraining settings, the data and the seed (not the rest of the run)."""
    key = {"pretrain": cfg.pretrain.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def encoder_folder(cfg: MoEKDConfig) -> Path:
    return Path(cfg.output_dir) / "pretrain" / f"pretrain-{pretrain_digest(cfg)}" / ENCODER_DIR


# ------------------------------------------------------------------------------------------------ corpus
def normalised(func: str) -> str:
    return " ".join(func.split())


def read_extra_corpus(paths: list[str]) -> tuple[list[str], int]:
    """The functions of each folder (*.c and *.h, recursively) or .jsonl file (`func` field), and how many files."""
    funcs, files = [], 0
    for path in paths:
        p = Path(path)
        if p.is_dir():
            for file in sorted(f for f in p.rglob("*") if f.suffix in (".c", ".h") and f.is_file()):
                files += 1
                funcs += [f.source for f in extract_functions(file.read_bytes())[0]]
        elif p.is_file() and p.suffix == ".jsonl":
            files += 1
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"pretrain.extra_corpus: {p}:{n} is not a JSON line; fix or remove it") from None
                if not isinstance(row, dict) or not isinstance(row.get("func"), str):
                    raise ConfigError(f"pretrain.extra_corpus: {p}:{n} has no string field `func`; each line must be "
                                      '{"func": "<C source>"}')
                funcs.append(row["func"])
        else:
            raise ConfigError(f"pretrain.extra_corpus: {path} is neither a folder nor a .jsonl file; give folders of "
                              "C code or JSONL files with a `func` field")
    return funcs, files


def build_corpus(cfg: MoEKDConfig, data: dict, log=print) -> list[str]:
    """The training split's functions, then the extra corpus's that are not validation or test functions."""
    corpus = list(data["train"]["func"])
    if cfg.pretrain.extra_corpus:
        extra, files = read_extra_corpus(cfg.pretrain.extra_corpus)
        held_out = {normalised(f) for split in ("valid", "test") for f in data[split]["func"]}
        kept = [f for f in extra if normalised(f) not in held_out]
        log(f"pretrain: extra corpus {len(extra):,} functions from {files} files; dropped {len(extra) - len(kept):,} "
            "equal to a validation or test function")
        corpus += kept
    return corpus


# ---------------------------------------------------------------------------------------------- masking
class MaskedFunctions(Dataset):
    """Encoded functions, each masked anew per epoch: `mask_prob` of its non-special tokens are predicted, 80% of
    those shown as <mask>, 10% as a random token, 10% unchanged. Row i of epoch e is masked by a generator seeded
    with (seed, e, i) only, so any worker, and a resumed run, masks it the same way."""

    def __init__(self, arrays: dict[str, np.ndarray], vocab_size: int, mask_prob: float, seed: int, epoch: int = 0):
        self.ids = torch.as_tensor(np.asarray(arrays["input_ids"]), dtype=torch.long)
        self.mask = torch.as_tensor(np.asarray(arrays["attention_mask"]), dtype=torch.long)
        self.vocab_size, self.mask_prob, self.seed, self.epoch = vocab_size, mask_prob, seed, epoch

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
        ids = self.ids[i].clone()
        maskable = (self.mask[i] == 1) & (ids >= len(SPECIALS))  # never <s>, </s>, padding
        predicted = (torch.rand(len(ids), generator=gen) < self.mask_prob) & maskable
        labels = torch.where(predicted, ids, torch.full_like(ids, IGNORE))
        roll = torch.rand(len(ids), generator=gen)
        ids[predicted & (roll < 0.8)] = SPECIALS.index("<mask>")
        swapped = predicted & (roll >= 0.8) & (roll < 0.9)
        ids[swapped] = torch.randint(len(SPECIALS), self.vocab_size, (int(swapped.sum()),), generator=gen)
        return {"input_ids": ids, "attention_mask": self.mask[i], "mlm_labels": labels}


def predicted_logits(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Vocabulary logits [P, V] at the batch's P predicted positions only. The projection onto the vocabulary,
    run on every token, costs several times a small encoder (64 -> 4,000 per token vs 2 layers of width 64);
    masked-LM needs it at the ~15% of tokens that are predicted."""
    mlm = getattr(model, "module", model)  # a DeepSpeed engine wraps the RobertaForMaskedLM
    hidden = mlm.roberta(**model_inputs(batch, device)).last_hidden_state
    return mlm.lm_head(hidden[batch["mlm_labels"].to(device) != IGNORE])


def mlm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of `predicted_logits` [P, V] against the predicted tokens (0 for a batch without any)."""
    labels = batch["mlm_labels"].long()
    targets = labels[labels != IGNORE].to(logits.device)
    if len(targets) == 0:
        return logits.sum() * 0.0  # keeps the graph: every rank still steps
    return torch.nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def held_out_metrics(model, dataset: MaskedFunctions, batch_size: int) -> dict[str, float]:
    """Masked-LM loss and masked-token accuracy on the held-out functions (always masked as in epoch 0)."""
    model.eval()
    device = model_device(model)
    loss, correct, count = 0.0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        batch = trim_padding(batch)
        logits = predicted_logits(model, batch, device).float()
        labels = batch["mlm_labels"].to(device)
        targets = labels[labels != IGNORE]
        loss += float(mlm_loss(logits, batch)) * len(targets)
        correct += int((logits.argmax(-1) == targets).sum())
        count += len(targets)
    return {"loss": loss / max(count, 1), "masked_accuracy": correct / max(count, 1)}


# ----------------------------------------------------------------------------------------------- worker
class PretrainJob(DeepSpeedJob):
    """The corpus is `train`, the held-out functions `valid`."""

    vocab_size: int = Field(ge=1)
    mask_prob: float = Field(gt=0, lt=1)


def pretrain_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed engine over RobertaForMaskedLM, dynamic masking, the schedule's warm-up and
    decay. Each epoch's checkpoint holds the best encoder so far (rank 0, safetensors; by held-out loss, or the
    last) and DeepSpeed's latest state; after a restart the workers resume from that state."""
    job = PretrainJob.model_validate(config)
    deepspeed = start_deepspeed(job)
    arch, sched = job.arch, job.schedule
    ctx = ray.train.get_context()
    corpus, holdout = ray.get(job.train), ray.get(job.valid)
    masked = dict(vocab_size=job.vocab_size, mask_prob=job.mask_prob, seed=job.seed)

    restored, history = ray_runtime.restored_state()
    torch.manual_seed(job.seed)
    model = RobertaForMaskedLM(roberta_config(arch, job.vocab_size))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=job.ds_config)
    if restored:
        engine.load_checkpoint(str(restored / ray_runtime.DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    best_state = (RobertaForMaskedLM.from_pretrained(str(restored), use_safetensors=True).state_dict()
                  if restored and ctx.get_world_rank() == 0 else None)
    # The reported rows name the held-out loss val_mlm_loss; BestEpoch compares val_loss (as it is updated below).
    best = BestEpoch(sched.keep_best_by, sched.patience, [{**r, "val_loss": r["val_mlm_loss"]} for r in history])
    train, held_out = MaskedFunctions(corpus, **masked), MaskedFunctions(holdout, **masked)  # held out: epoch 0 masks
    loader = ray.train.torch.prepare_data_loader(DataLoader(
        train, batch_size=sched.batch_size, shuffle=True, generator=torch.Generator().manual_seed(job.seed)))
    tokens_per_row = float(np.asarray(corpus["attention_mask"]).sum(1).mean())

    resumed_from = len(history)
    step = deepspeed_step(engine, job, sched, len(loader), resumed_from)
    ticker = progress.Ticker("pretrain", sched.epochs * len(loader), enabled=ctx.get_world_rank() == 0)
    for epoch in range(resumed_from + 1, sched.epochs + 1):
        if history and history[-1]["final"]:
            break
        start_epoch(loader, epoch, job.seed)
        train.epoch = epoch  # new masks every epoch
        stats = train_epoch(engine, loader, mlm_loss, step, ticker.epoch(epoch, sched.epochs), predicted_logits)
        val = held_out_metrics(engine, held_out, job.eval_batch_size)
        better, stop = best.decide(epoch, {f"val_{k}": v for k, v in val.items()}, engine.device)  # rank 0's
        if better:
            best_state = gathered_state(engine, ctx.get_world_rank())
        tokens_per_s = stats["samples_per_s"] * tokens_per_row * ctx.get_world_size()
        metrics = {"epoch": epoch, **stats, "tokens_per_s": tokens_per_s, "val_mlm_loss": val["loss"],
                   "val_masked_accuracy": val["masked_accuracy"], "best_epoch": best.epoch,
                   "final": int(stop or epoch == sched.epochs), "resumed_from": resumed_from}
        if ctx.get_world_rank() == 0:
            print(f"[pretrain] epoch {epoch}/{sched.epochs}: mlm loss {stats['train_loss']:.4f}, "
                  f"{tokens_per_s:,.0f} tokens/s, held-out loss {val['loss']:.4f} masked-token accuracy "
                  f"{val['masked_accuracy']:.3f}, best epoch {best.epoch}")
        ray_runtime.report_epoch(metrics, history,
                                 lambda folder: save_deepspeed(engine, folder, ctx.get_world_rank(), best_state))
        if stop:
            break


# ----------------------------------------------------------------------------------------------- driver
def pretrain_encoder(cfg: MoEKDConfig, log=print, data: dict | None = None,
                     bf16_stages: tuple[str, ...] = ("pretrain",)) -> Path:
    """The pretrained encoder's folder (model + tokenizer): reused when one with the same settings exists, else
    pretrained now (an interrupted pretraining resumes from its latest checkpoint). `data`: the splits, when the
    caller has loaded them already. `bf16_stages`: the stages whose bf16 the GPUs are checked for first."""
    encoder = encoder_folder(cfg)
    if (encoder / "model.safetensors").is_file():
        log(f"pretrain: reusing {encoder} (same pretraining settings, data and seed: digest {pretrain_digest(cfg)})")
        return encoder
    pc, arch = cfg.pretrain, cfg.pretrain.arch
    data = data if data is not None else load_devign(cfg.data, cfg.seed)
    corpus = build_corpus(cfg, data, log)  # bad data or extra corpus: one line, before anything is written
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    start = time.perf_counter()
    tokenizer = train_bpe(corpus, arch.vocab_size, arch.max_length)
    enc = encode(tokenizer, corpus, arch.max_length)
    order = np.random.default_rng(cfg.seed).permutation(len(corpus))
    n_held = max(1, int(round(pc.holdout * len(corpus))))
    held, rest = order[:n_held], order[n_held:]
    log(f"pretrain: {len(rest):,} functions ({int(enc['attention_mask'][rest].sum()):,} tokens), {n_held:,} held "
        f"out; {arch.num_layers} x {arch.hidden_size} encoder, vocabulary {len(tokenizer):,}, {pc.schedule.epochs} "
        f"epochs on {pc.resources.num_workers} workers, ZeRO-{pc.zero_stage}")
    ray_runtime.init_ray(cfg)
    ray_runtime.check_bf16(cfg, bf16_stages)  # a GPU without bf16: one line before any training
    folder = encoder.parent
    folder.mkdir(parents=True, exist_ok=True)
    name = folder.name
    job = PretrainJob(
        name="pretrain", arch=arch, vocab_size=len(tokenizer), mask_prob=pc.mask_prob, schedule=pc.schedule,
        ds_config=deepspeed_config(pc), eval_batch_size=cfg.eval.batch_size, threads=pc.resources.cpus_per_worker,
        cpu_shm_comm=pc.cpu_shm_comm, seed=cfg.seed, train=ray.put({k: v[rest] for k, v in enc.items()}),
        valid=ray.put({k: v[held] for k, v in enc.items()}), fault_injection=cfg.ray.fault_injection,
        fault_marker=str(folder / f"{name}.fault_injected"),
    )
    result = ray_runtime.make_trainer(pretrain_worker, job.loop_config(), pc.resources, name,
                                      ray_runtime.storage_path(cfg, folder),
                                      max_failures=cfg.ray.max_failures).fit()
    ray_runtime.copy_atomically(result.checkpoint, encoder, lambda tmp: tokenizer.save_pretrained(str(tmp)))
    rows = ray_runtime.epoch_rows(result)
    tracker = tracking.Tracker(folder, experiment_id, log, cfg.mlflow.tracking_uri)
    with tracker.run(None, name):
        tracker.set_tags({"moekd.stage": "pretrain", "moekd.pretrain_digest": pretrain_digest(cfg),
                          "moekd.encoder": str(encoder.resolve())})
        tracker.log_params({"pretrain." + k: v for k, v in tracking.flatten(pc.model_dump(mode="json")).items()}
                           | {"corpus_functions": len(rest), "holdout_functions": n_held})
        tracker.log_epochs(rows)
        tracker.log_metrics({"seconds": time.perf_counter() - start})
    last = rows[-1]
    log(f"pretrain: encoder in {encoder} ({time.perf_counter() - start:.0f} s; held-out masked-token accuracy "
        f"{last['val_masked_accuracy']:.3f}, {last['tokens_per_s']:,.0f} tokens/s)")
    return encoder


def with_pretrained_encoder(cfg: MoEKDConfig, log=print, data: dict | None = None) -> MoEKDConfig:
    """`cfg` with each `source: pretrain` expert pointing at the pretrained encoder's folder (pretrained first, or
    reused): from there on it is a pretrained checkpoint like any other, with its own tokenizer."""
    specs = cfg.experts.specs()
    if not any(isinstance(s, PretrainSource) for s in specs):
        return cfg
    # bf16 of every stage checked before pretraining: the experts' and student's GPUs, too, before hours of it
    encoder = str(pretrain_encoder(cfg, log, data, ("pretrain", "experts", "distill")).resolve())
    models = [PretrainedConfig(name_or_path=encoder, max_length=s.max_length or cfg.pretrain.arch.max_length)
              if isinstance(s, PretrainSource) else s for s in specs]
    tree = cfg.model_dump(mode="json")
    tree["experts"]["models"] = [m.model_dump(mode="json") for m in models]
    return MoEKDConfig.model_validate(tree)
