"""A study's sampler and pruner, built alike in every process that runs its trials."""

from __future__ import annotations


import optuna


def build_pruner(name: str):
    """The study's pruner (`--pruner`); a pruner is per process, so every job builds the same one."""
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=2),
            "none": optuna.pruners.NopPruner}[name]()


def set_sampler(study: optuna.Study, name: str, seed: int, storage_url: str) -> None:
    study.sampler = build_sampler(name, seed, len(study.get_trials(deepcopy=False)))
    if "://" in storage_url and not storage_url.startswith("sqlite"):
        # A database server is shared by workers that all pass the same --seed and may start at
        # the same moment (compose replicas do): identically seeded samplers would propose the
        # same trials in every worker.
        study.sampler.reseed_rng()


def build_sampler(name: str, seed: int, trials_so_far: int):
    """The study's sampler, seeded with the run seed *and* the number of trials already in the
    study: a resumed study must not draw the same sequence again (a sampler seeded with the run
    seed alone re-proposes, after a restart, exactly the parameters it has already evaluated)."""
    session_seed = (seed * 1_000_003 + trials_so_far) % 2**32
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=session_seed)
    return optuna.samplers.RandomSampler(seed=session_seed)
