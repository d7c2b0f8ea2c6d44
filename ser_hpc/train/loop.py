"""The training loop: a pack of runs in one process, one backbone forward per batch for all heads.

A pack is K runs that differ only in head settings (``packing.py``); a lone run is a pack
of one, so this is the only loop. Read top to bottom:

    setup   data, backbones (or cached features), one Head per run       (inputs.py, heads.py)
    resume  every head to one common data position from its checkpoints
    loop    shared backbone forward; each head: loss, backward, lr, step
            every eval_every: dev scores, best weights, lr decay, early stop
            every checkpoint_every: checkpoint; a preemption signal checkpoints and stops
    finish  test predictions of every finished head in one pass; final.json

Under DDP or DeepSpeed the same loop runs on every rank; the engine (``engine.py``) wraps
the head's model and optimizer, and losses are normalised by the weight of the global step.
Resume is exact: data order, optimizers, lr schedules, RNG streams and best-so-far.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, copy_config
from ..data.sources import load_splits
from ..locks import hold_run_folders
from ..metrics import score
from ..models.dropout import global_batch_rows
from ..run_status import RunStatus
from . import distributed as D
from .heads import (Head, Predictions, final_record, load_checkpoint, new_head, predict, save_checkpoint, saved_state,
                    write_final)
from .inputs import PackInputs
from .packing import check_pack
from .preemption import Preempted, PreemptionFlag
from .run_folder import RunFolder, close_tracking, failure_record
from .schedule import lr_factor

log = logging.getLogger("ser_hpc.train")


def train_pack(cfgs: list[Config], flag: PreemptionFlag | None = None, wait: bool | float = False) -> list[dict]:
    """Train a pack of runs (a single run is a pack of one), each into its own ``run.dir``;
    returns their final records (also written as final.json).

    Finished runs are skipped. Bad input raises before training starts, after recording the
    reason in every unfinished run's final.json so a grid's aggregation can report it. A
    diverged run ends as failed alone. On a preemption signal every run checkpoints and
    ``Preempted`` is raised; calling again resumes.

    Every run folder is locked first, here and nowhere else (``ser_hpc.locks``; the main rank
    holds the locks): while another live process trains one of them, ``LockHeld`` is raised
    before anything is written, or with ``wait`` (True, or seconds) this waits for it. A
    folder is claimed (config.yaml) only once the data and backbones checked out. The
    caller's configs are not changed.
    """
    for cfg in cfgs:
        if not cfg.run.dir:
            raise ConfigError(f"config key 'run.dir' (the run folder) is not set for run {cfg.run.name!r}")
        if ".." in Path(cfg.run.dir).parts:
            log.warning("run.dir %s is the folder %s", cfg.run.dir, Path(cfg.run.dir).resolve())
    check_pack(cfgs)  # a pack that cannot be is refused before any folder (or lock) is made
    env = D.detect()
    with hold_run_folders([c.run.dir for c in cfgs], wait=wait, enabled=env.is_main):
        try:
            return _claim_and_train(cfgs, flag, env)
        finally:
            close_tracking([c.run.dir for c in cfgs])


def _claim_and_train(cfgs: list[Config], flag: PreemptionFlag | None, env: D.DistEnv) -> list[dict]:
    if env.enabled and cfgs[0].train.strategy == "single":
        raise ConfigError(f"{env.world} ranks were started but train.strategy is 'single'; use ddp or deepspeed")
    folders = [RunFolder(c.run.dir) for c in cfgs]
    if env.is_main:
        for cfg, folder in zip(cfgs, folders):
            folder.check_claim(cfg)  # another config's results are refused; nothing is written yet
    device = D.device_for(env, cfgs[0].train.device)
    D.init(env, device)
    D.barrier(env)
    finals: list[dict | None] = [f.read_final() if f.is_done() else None for f in folders]
    for cfg, final in zip(cfgs, finals):
        if final is not None:
            log.info("run %s already done in %s: skipping", cfg.run.name, cfg.run.dir)
    todo = [i for i, final in enumerate(finals) if final is None]
    if not todo:
        return finals
    start, heads = time.monotonic(), []
    # A flag from the caller (a grid task) is already installed; else this call installs one.
    with contextlib.nullcontext(flag) if flag else PreemptionFlag() as flag:
        try:
            splits = load_splits(cfgs[0].data, needs_text=any("text" in c.model.modalities for c in cfgs))
            inputs, heads = setup([cfgs[i] for i in todo], splits, env, device, [folders[i] for i in todo])
            if env.is_main:  # claimed only now that the data and backbones checked out
                for i, h in zip(todo, heads):
                    folders[i].claim(h.cfg)  # the run's config with its resolved classes
            for i, record in zip(todo, _train(heads, inputs, env, flag)):
                finals[i] = record
        except Preempted:
            raise
        except Exception as exc:
            # A head that diverged already recorded why; every other unfinished run gets this reason.
            if env.is_main:
                diverged = {h.folder.path for h in heads if h.status == RunStatus.FAILED}
                for i in (i for i in todo if folders[i].path not in diverged):
                    folders[i].write_failure(cfgs[i].run.name, f"{type(exc).__name__}: {exc}",
                                             elapsed_s=round(time.monotonic() - start, 2),
                                             traceback=traceback.format_exc(limit=8))
            raise
    D.barrier(env)
    return finals


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfgs: list[Config], splits, env: D.DistEnv, device: torch.device,
          folders: list[RunFolder] | None = None) -> tuple[PackInputs, list[Head]]:
    """The pack's shared inputs and one head per run. Each head's ``cfg`` is a copy of its
    run's config with the resolved classes (``data.labels``, recorded in config.yaml); the
    caller's configs are not changed."""
    cfgs = [copy_config(c) for c in cfgs]
    for c in cfgs:
        c.data.labels = list(splits.labels)
    _seed_everything(cfgs[0].train.seed)
    inputs = PackInputs(cfgs, splits, env, device)
    if inputs.store is not None:
        _seed_everything(cfgs[0].train.seed)  # extraction must not shift the heads' initialisation
    folders = folders or [RunFolder(c.run.dir) for c in cfgs]
    train_labels = [e.label for e in splits.train]
    return inputs, [new_head(c, f, inputs.backbones, train_labels, env, device, splits.labels_configured)
                    for c, f in zip(cfgs, folders)]


def _train(heads: list[Head], inputs: PackInputs, env: D.DistEnv, flag: PreemptionFlag) -> list[dict]:
    # ``t``: the pack's shared settings (batches, steps, evaluation and checkpoint cadence);
    # every head setting (HEAD_KEYS) is read from the head's own config, ``h.cfg``.
    t, total = inputs.cfg.train, inputs.total_steps
    step, epoch, batch_in_epoch = _resume(heads, total, env)
    _log_start(heads, inputs, step, env)
    batches = inputs.batches(epoch, batch_in_epoch)
    window_t, window_clips = time.monotonic(), 0
    for h in heads:
        h.model.train()
    training = [h for h in heads if h.status == RunStatus.RUNNING]
    while training and step < total:
        micro = [next(batches) for _ in range(t.grad_accum_steps)]
        epoch, batch_in_epoch = micro[-1][:2]
        # Normalise by the weight of the whole global step (all micro-batches, all ranks), so
        # N ranks x b clips give the same gradient as one process with N*b clips.
        step_weight = {id(h): D.all_sum(float(sum(h.loss_weights[b.labels.to(h.loss_weights.device)].sum()
                                                  for _, _, b in micro)), env) for h in training}
        step_loss = {id(h): 0.0 for h in training}
        for _, _, batch in micro:
            feats = inputs.features(batch)
            # This rank's clips are rows rank*b.. of the global batch: dropout masks are drawn
            # for all rows and these kept, so a clip's mask does not depend on its rank.
            rows = (env.rank * len(batch.ids), env.world * len(batch.ids))
            for h in [h for h in training if h.status == RunStatus.RUNNING]:
                with h.rng, global_batch_rows(*rows):  # this head's dropout masks, whatever the others drew
                    logits = inputs.logits(h.engine, batch, feats)
                loss_sum = h.weighted_ce_sum(logits, batch.labels.to(logits.device))
                # Every rank decides together, so no rank waits in a backward the others skipped.
                if D.any_true(not bool(torch.isfinite(loss_sum)), env):
                    h.status, h.failure = RunStatus.FAILED, (f"training diverged: loss is {loss_sum.item()} at step "
                                                     f"{h.state.step + 1} (epoch {h.state.epoch})")
                    log.error("run %s failed: %s", h.name, h.failure)
                    continue
                h.engine.backward(loss_sum * (env.world / step_weight[id(h)]))
                step_loss[id(h)] += loss_sum.item()
            window_clips += len(batch.ids) * env.world
        step += 1
        stepped = [h for h in training if h.status == RunStatus.RUNNING]
        for h in stepped:
            s, own = h.state, h.cfg.train  # the schedule and clipping are head settings (HEAD_KEYS)
            h.engine.set_lr_factor(lr_factor(own.lr_schedule, s.step, total, own.warmup_steps, s.plateau_scale))
            h.engine.step(own.max_grad_norm)
            s.window_loss += D.all_sum(step_loss[id(h)], env) / step_weight[id(h)]
            s.window_n += 1
            s.step, s.epoch, s.batch_in_epoch = step, epoch, batch_in_epoch
        if step % t.log_every == 0 and env.is_main:
            rate = window_clips / max(time.monotonic() - window_t, 1e-9)
            for h in stepped:
                s = h.state
                log.info("run %s step %d/%d epoch %d loss %.4f lr %.2e %.1f clips/s", h.name, s.step, total,
                         s.epoch, s.window_loss / max(s.window_n, 1), h.engine.lrs()[0], rate)
            window_t, window_clips = time.monotonic(), 0
        if step % t.eval_every == 0 or step == total:
            for h, dev in zip(stepped, predict(inputs, stepped, inputs.splits.dev, cache=True)):
                _record_evaluation(h, dev, env)
        preempted = D.any_true(flag.raised, env)
        for h in stepped:
            if step % (t.checkpoint_every or t.eval_every) == 0 or preempted or h.status != RunStatus.RUNNING \
                    or step == total:
                save_checkpoint(h, env)
            if h.status == RunStatus.RUNNING and step == total:
                h.status = RunStatus.DONE
        for h in (h for h in training if h.status == RunStatus.FAILED):  # a diverged head stops alone
            h.final = failure_record(h.folder.path.name, h.name, h.failure, elapsed_s=round(h.elapsed(), 2))
            write_final(h, h.final, env)
        training = [h for h in training if h.status == RunStatus.RUNNING]
        if preempted and training:
            raise Preempted(step, flag.signum or 0, [h.folder.path.name for h in heads if h.status != RunStatus.FAILED])
    return _finish(heads, inputs, env)


def _resume(heads: list[Head], total: int, env: D.DistEnv) -> tuple[int, int, int]:
    """Bring every head to one common data position; returns (step, epoch, batch_in_epoch).

    Finished heads keep their last checkpoint. Heads still training resume at the newest
    step for which all of them hold a checkpoint (a kill between two heads' checkpoints
    leaves them one evaluation apart); heads ahead of it replay the same batches and end
    exactly where they were. A head without a usable checkpoint starts afresh.
    """
    if env.is_main:
        for h in heads:
            h.checkpoints.cleanup_partial()
    D.barrier(env)
    training = []
    for h in heads:
        saved = saved_state(h)
        if saved is not None and (saved.stopped_early or saved.step >= total):
            load_checkpoint(h, saved.step, env)
            h.status = RunStatus.DONE
        else:
            training.append(h)
    common = set.intersection(*(set(h.checkpoints.steps()) for h in training)) if training else set()
    step = max(common, default=0)
    for h in training:
        if step:
            load_checkpoint(h, step, env)
        elif env.is_main:  # an earlier attempt's files no longer apply
            h.checkpoints.remove_all()
            h.folder.start_attempt()
    D.barrier(env)
    if not training or not step:
        return 0, 0, 0
    s = training[0].state
    return s.step, s.epoch, s.batch_in_epoch


def _record_evaluation(h: Head, preds: Predictions, env: D.DistEnv) -> None:
    """Log a dev evaluation; keep the best weights; decay the lr; stop early when due."""
    s, t = h.state, h.cfg.train
    scores = score(preds.labels, preds.probs.argmax(1), h.labels)
    record = {"step": s.step, "epoch": s.epoch, "train_loss": s.window_loss / max(s.window_n, 1),
              "dev_loss": preds.loss, "dev_macro_f1": scores["macro_f1"], "dev_ua": scores["ua"],
              "dev_wa": scores["wa"], "lr": h.engine.lrs()[0], "elapsed_s": round(h.elapsed(), 2)}
    s.window_loss, s.window_n = 0.0, 0
    improved = scores["macro_f1"] > s.best["dev_macro_f1"]
    if env.is_main:
        h.folder.log_metrics(record)
        log.info("run %s eval step %d: dev macro-F1 %.4f (best %.4f)%s", h.name, s.step, scores["macro_f1"],
                 max(s.best["dev_macro_f1"], scores["macro_f1"]), " *" if improved else "")
    if improved:
        s.best = {"dev_macro_f1": scores["macro_f1"], "step": s.step, "epoch": s.epoch, **scores}
        s.bad_evals = s.since_decay = 0
        weights = h.engine.trainable_state()  # collective under ZeRO-3
        if env.is_main:
            h.folder.save_best(weights)
            RunFolder.write_probs(h.folder.dev_probs, preds.ids, preds.labels, preds.probs, h.labels)
        return
    s.bad_evals += 1
    s.since_decay += 1
    if t.lr_schedule == "plateau" and s.since_decay >= t.lr_patience:
        s.plateau_scale *= t.lr_decay  # applied from the next optimizer step on
        s.since_decay = 0
    if t.early_stop_patience and s.bad_evals >= t.early_stop_patience:
        log.info("run %s: early stop at step %d, no improvement in %d evaluations", h.name, s.step, s.bad_evals)
        s.stopped_early = True
        h.status = RunStatus.DONE


def _finish(heads: list[Head], inputs: PackInputs, env: D.DistEnv) -> list[dict]:
    """Test predictions of every finished head in one pass; final records of all."""
    done = [h for h in heads if h.status == RunStatus.DONE]
    tests: list[Predictions] = []
    if done and inputs.splits.test:
        for h in done:
            h.engine.load_best(h.folder)
        tests = predict(inputs, done, inputs.splits.test, cache=inputs.eval_store is not None)
    finals = []
    for h in heads:
        if h.status == RunStatus.FAILED:  # a diverged head wrote its record when it stopped
            finals.append(h.final)
            continue
        test = tests[done.index(h)] if h in done and tests else None
        finals.append(final_record(h, test, inputs.splits.test_has_labels, env))
        write_final(h, finals[-1], env)
    return finals


def _log_start(heads: list[Head], inputs: PackInputs, step: int, env: D.DistEnv) -> None:
    if env.is_main:
        sp, t = inputs.splits, inputs.cfg.train
        params = ", ".join(f"{h.name} ({sum(p.numel() for p in h.model.parameters() if p.requires_grad)} params)"
                           for h in heads)
        log.info("pack of %d run(s): %d train / %d dev / %d test clips, %d steps (%d per epoch), %s on %s x%d, "
                 "%s backbone forward%s; %s", len(heads), len(sp.train), len(sp.dev), len(sp.test), inputs.total_steps,
                 inputs.steps_per_epoch, t.strategy, inputs.device, env.world,
                 "one shared" if inputs.shared_forward else "own", f", resuming at step {step}" if step else "", params)
