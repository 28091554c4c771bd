"""The objective Optuna calls per trial: the trial's experts trained in lock-step, pruned on their
fused validation score."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import optuna
import torch

from ltexp import lifecycle, schema, tracking
from ltexp.config import RunConfig
from ltexp.experiment import fusion_table
from ltexp.training import ExpertCache, Lockstep, Prepared, build_experts, checkpointer
from ltexp.tune.space import SearchSpace, apply, objective_value


@dataclass
class Objective:
    """The callable objective (optuna-examples style): holds the preloaded data and the expert cache."""

    base: RunConfig
    space: SearchSpace
    terms: list[tuple[float, str]]
    prep: Prepared
    parent: tracking.Run
    cache: ExpertCache = field(default_factory=ExpertCache)
    overhead_s: list[float] = field(default_factory=list)
    trial_s: list[float] = field(default_factory=list)

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        compute = 0.0
        cfg = apply(self.base, self.space.suggest(trial))
        tags = {**tracking.run_tags(cfg, "trial"), schema.TRIAL_NUMBER: str(trial.number),
                schema.TORCH_THREADS: str(torch.get_num_threads())}
        with self.parent.child(f"trial-{trial.number}", tags) as run:
            run.log_params({**{k: str(v) for k, v in trial.params.items()}, "trial_number": trial.number},
                           synchronous=False)
            method, specs, layout = build_experts(cfg, self.prep.data.info)
            # Experts train in lockstep, one epoch each in turn; after every epoch the pruner sees
            # the objective on the *fused* validation prediction of all experts, a number that is
            # comparable across trials whatever the split (an expert's own accuracy is not: a
            # 2-class head expert scores higher than an 8-class one).
            cadence = lifecycle.Cadence(lifecycle.Every.parse(cfg.tracking.checkpoint_every))
            lockstep = Lockstep(cfg, method, specs, self.prep, self.cache, lambda spec: checkpointer(
                cfg, spec, run.run_id, self.parent.run_id, f"trial {trial.number} expert {spec.name}", cadence))
            step = 0
            try:
                t0 = time.perf_counter()
                for step, records, replayed in lockstep.rounds():
                    metrics = {f"{k}__expert_{name}": v for name, record in records.items() for k, v in record.items()
                               if k.startswith("val_") or k == "train_loss"}
                    if not replayed:
                        value, _ = self.fused(cfg, layout, lockstep.models)
                        metrics["objective"] = value
                    compute += time.perf_counter() - t0
                    run.log_epoch({**metrics, "epoch": step})
                    if not replayed:
                        trial.report(value, step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"pruned at epoch {step}: fused {self.space.tune.metric} "
                                                     f"{value:.4f}")
                    t0 = time.perf_counter()
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM: Optuna fails the trial; queue its parameters so the next session
                # runs it first and its experts continue from their checkpoints.
                trial.study.enqueue_trial(trial.params, user_attrs={schema.RETRY_OF: trial.number})
                raise
            except optuna.TrialPruned:
                run.set_tags({schema.TRIAL_STATE: "PRUNED"})
                run.status = "KILLED"
                self._account(started, compute)
                lockstep.clear_checkpoints()
                raise
            t0 = time.perf_counter()
            for model in lockstep.models:
                model.eval()
            value, val_metrics = self.fused(cfg, layout, lockstep.models)
            compute += time.perf_counter() - t0
            overhead = self._account(started, compute)
            # One write for the trial's results (metrics and state tag together).
            # The final values end the per-epoch curves (the last epoch's step); the trial's times
            # have no curve, so they sit at step 0 (bars in MLflow's chart view).
            run.log_batch(metrics={**{f"val_{k}": v for k, v in val_metrics.items()}, "objective": value},
                          tags={schema.TRIAL_STATE: "COMPLETE"}, step=step,
                          summaries={"trial_time_s": self.trial_s[-1], "overhead_s": overhead})
            lockstep.clear_checkpoints()
        return value

    def fused(self, cfg: RunConfig, layout, models: list) -> tuple[float, dict[str, float]]:
        """The objective and validation metrics of the experts' fused prediction (trial's rule)."""
        from ltexp.predictor import FusedPredictor

        predictor = FusedPredictor(models, layout, cfg.split.fusion, self.prep.data.info.class_names,
                                   self.prep.data.image_shape)
        val = (predictor.expert_outputs(self.prep.splits.val.images), self.prep.splits.val.labels)
        row = fusion_table(layout, val, self.prep.data.info, rules=[cfg.split.fusion]).iloc[0]
        val_metrics = {k[4:]: float(row[k]) for k in row.index if k.startswith("val_")}
        return objective_value(self.terms, val_metrics), val_metrics

    def _account(self, started: float, compute: float) -> float:
        total = time.perf_counter() - started
        self.trial_s.append(total)
        self.overhead_s.append(total - compute)
        return total - compute
