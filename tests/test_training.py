"""ltexp.training: experts trained in lock-step (a tuning trial) are the experts trained alone."""

import torch

from ltexp.config import resolve_config
from ltexp.training import ExpertCache, Lockstep, build_experts, prepare, train_expert


def test_experts_in_lockstep_take_one_epoch_each_per_round_and_equal_experts_trained_alone():
    cfg = resolve_config({"optim": {"epochs": 3}, "method": {"method": "split", "lws_epochs": 1}})
    prep = prepare(cfg)
    method, specs, _ = build_experts(cfg, prep.data.info)
    assert len(specs) == 2
    cache = ExpertCache()
    lockstep = Lockstep(cfg, method, specs, prep, cache, lambda spec: None)
    rounds = list(lockstep.rounds())
    epochs = 3 + 1  # the network's epochs, then LWS's
    assert [r[0] for r in rounds] == list(range(1, epochs + 1))
    assert all(set(records) == {s.name for s in specs} and not replayed for _, records, replayed in rounds)
    assert [r[1][specs[0].name]["epoch"] for r in rounds] == list(range(1, epochs + 1))
    assert cache.misses == 2 and all(cache.has(k) for k in lockstep._keys)  # finished experts are cached
    for spec, model in zip(specs, lockstep.models):
        alone, _, reused = train_expert(cfg, method, spec, prep, None, False)
        assert not reused
        for a, b in zip(alone.state_dict().values(), model.state_dict().values()):
            torch.testing.assert_close(a, b)  # the same seed, data and engine: the same weights
    again = Lockstep(cfg, method, specs, prep, cache, lambda spec: None)
    assert list(again.rounds()) == [] and cache.misses == 2  # both from the cache: no rounds to train
