"""One epoch after another: the training loop of `Trainer.run` (trainer.py)."""

from __future__ import annotations

import time

import torch


def train_epochs(t, bar) -> None:
    """Epochs until done or told to stop: steps, step records, fidelity records, evaluation,
    the epoch checkpoint. `t` is the Trainer (setup done, run directory open)."""
    cfg = t.config
    dev = t.device
    is_cuda = dev.type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    first_record = t.step == 0
    while t.epoch < cfg.epochs and t.step < t.total_steps and not t.stop_reason:
        epoch = t.epoch
        t.train_loader.set_epoch(epoch)
        t.model.train()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = epoch_steps = 0
        win_loss = torch.zeros((), device=dev)
        win_correct = torch.zeros((), device=dev, dtype=torch.long)
        win_seen, win_steps = 0, 0
        t_win = time.perf_counter()
        for x, y in t.train_loader:
            t.sync_stop()
            if t.step >= t.total_steps or t.stop_reason:
                break
            t0 = time.perf_counter()
            lr = t.schedule.lr_at(t.progress_at(t.step))
            for g in t.opt.param_groups:
                g["lr"] = lr
            loss, n_right = t.train_step(x, y)
            t.step += 1
            epoch_steps += 1
            b = y.shape[0]
            loss_sum += loss.float() * b
            correct += n_right
            win_loss += loss.float() * b
            win_correct += n_right
            seen += b
            win_seen += b
            win_steps += 1
            if (cfg.fidelity_every and t.step % cfg.fidelity_every == 0 and not t.policy.is_exact
                    and t.is_main):
                t.record_fidelity(x, y, epoch)
            if t.step % cfg.log_every == 0 or t.step == 1 or t.step == t.total_steps:
                if is_cuda:
                    torch.cuda.synchronize(dev)
                now = time.perf_counter()
                t.train_time += now - t0
                dt = now - t_win
                w_loss, w_correct, w_seen = t.all_sum(win_loss, win_correct, torch.tensor(float(win_seen)))
                w_seen = int(w_seen.item())
                rec = {"type": "step", "step": t.step, "epoch": epoch,
                       "loss": round((w_loss / w_seen).item(), 6),
                       "acc": round(w_correct.item() / w_seen, 6), "lr": lr,
                       "step_time": round(dt / win_steps, 6),
                       "samples_per_s": round(w_seen / dt, 1) if dt > 0 else None}
                if first_record:
                    rec["saved_bytes"] = t.saved_report.total_bytes
                    first_record = False
                if is_cuda:
                    rec["cuda_allocated"] = torch.cuda.memory_allocated(dev)
                    rec["cuda_peak"] = torch.cuda.max_memory_allocated(dev)
                rec["wall"] = round(t.wall_before + now - t.session_start, 3)
                t.writer.append(rec)
                if bar is not None:
                    bar.update(t.step - bar.n)
                    bar.set_postfix({"loss": f"{rec['loss']:.3f}", "acc": f"{rec['acc']:.3f}", "lr": f"{lr:.4f}"})
                t.trigger_callbacks("on_log", rec)
                win_loss.zero_()
                win_correct.zero_()
                win_seen, win_steps = 0, 0
                t_win = time.perf_counter()
            else:
                t.train_time += time.perf_counter() - t0
            t.trigger_callbacks("on_step")
            if cfg.time_budget and t.wall() >= cfg.time_budget:
                t.request_stop("time budget")
        t.sync_stop()
        if t.world > 1:
            loss_sum, correct, g_seen = t.all_sum(loss_sum, correct, torch.tensor(float(seen)))
            seen = int(g_seen.item())
        if seen == 0:
            break
        interrupted = t.stop_reason not in (None, "time budget")
        if interrupted and epoch_steps < t.steps_per_epoch:
            return  # a mid-epoch stop: no eval, no epoch checkpoint (resume restarts this epoch)
        t.epoch += 1
        last = t.epoch >= cfg.epochs or t.step >= t.total_steps or t.stop_reason is not None
        if t.step >= t.total_steps and t.epoch < cfg.epochs:
            t.request_stop("step cap")
        if (last or t.epoch % cfg.eval_every == 0) and not interrupted and t.is_main:
            ev = t.evaluate()
            train_loss, train_acc = (loss_sum / seen).item(), correct.item() / seen
            rec = {"type": "eval", "epoch": t.epoch, "step": t.step,
                   "val_loss": ev["loss"], "val_acc": ev["acc"],
                   "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                   "per_class_acc": ev["per_class_acc"],
                   "wall": round(t.wall_before + time.perf_counter() - t.session_start, 3)}
            t.last_eval = {"val_loss": ev["loss"], "val_acc": ev["acc"], "per_class_acc": ev["per_class_acc"],
                              "train_loss": rec["train_loss"], "train_acc": rec["train_acc"]}
            if ev["acc"] is not None and (t.best_val_acc is None or ev["acc"] > t.best_val_acc):
                t.best_val_acc, t.best_epoch = ev["acc"], t.epoch
            t.writer.append(rec)
            if bar is not None:
                bar.write(f"epoch {t.epoch}/{cfg.epochs}  val_acc {ev['acc']}  val_loss {ev['loss']}"
                          f"  train_loss {rec['train_loss']:.4f}")
            t.trigger_callbacks("on_epoch", rec)
        t.checkpoint()
        t.write_summary("running")
        if interrupted:
            return
