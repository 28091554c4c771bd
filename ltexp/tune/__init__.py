"""Optuna tuning of split experts (`ltexp tune`); what it shares with `ltexp grid` to coordinate
workers (storages, the trial budget, the parent-run claim) is in `ltexp.coord`.

Search space (always): the split point(s) `split_at` over class ranks, `clip_norm` (off, or log
scale in [clip_min, clip_max]) and the fusion rule. Optional (`--search`): lr, weight_decay,
expert_mode, other_size, lws, num_groups. The objective is a validation metric of the honest
fused prediction; the test set is touched once, for the best trial's model.

MLflow shape: one parent run (role `tune`) for the study, one nested run (role `trial`) per
trial with its per-epoch validation curve and final state (COMPLETE / PRUNED / FAIL). Trying
another fusion rule never retrains experts, and an expert whose training settings were seen
before is reused (`ExpertCache`). Running the same command again continues the study
(`load_if_exists`) up to `n_trials` finished trials; with an RDB storage, heartbeats mark a
trial whose worker died and it is retried. `--jobs N` runs N trials at once on one machine
(`TuneJobs`: N-1 spawned helper processes, one trial budget, one parent run, one expert cache
folder).

Rooms: `space` (what a trial draws, the objective's formula), `objective` (one trial), `samplers`
(the sampler and pruner every process builds alike), `jobs` (the helper processes) and `study`
(`run_study`, the session from first trial to registered model).
"""

from ltexp.tune.jobs import frozen_heap
from ltexp.tune.space import SearchSpace, apply, default_model_name, parse_objective
from ltexp.tune.study import TuneResult, log_plots, run_study

__all__ = ["SearchSpace", "TuneResult", "apply", "default_model_name", "frozen_heap", "log_plots", "parse_objective",
           "run_study"]
