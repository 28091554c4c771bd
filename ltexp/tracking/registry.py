"""The model registry: registering a run's pyfunc as a version, and the promotion rule that moves
`@candidate` and `@champion` (never to a version worse on the same validation metric and data)."""

from __future__ import annotations


import mlflow
from mlflow.tracking import MlflowClient

from ltexp import schema


def register_model(run_id: str, name: str, alias: str = "candidate", extra: dict[str, str] | None = None) -> int:
    """Register the run's pyfunc model as a new version of `name` and point `alias` at it.

    The version is tagged with the run's data set, method and test metrics, and `extra`, all in
    the request that creates it. Aliases only; the deprecated stages are never used. Returns the
    version number.
    """
    from ltexp import LtexpError

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise LtexpError(f"--run-id {run_id!r} is not a run in {mlflow.get_tracking_uri()}") from None
    model_uri = run.data.tags.get(schema.MODEL_URI)
    if not model_uri:
        raise LtexpError(f"run {run_id} has no ltexp model (status {run.info.status}): train it to the end first")
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("ltexp.") and k not in (schema.MODEL_URI, schema.ERROR)}
    tags.update({f"ltexp.{k}": f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("test_")})
    tags[schema.RUN_ID] = run_id
    version = mlflow.register_model(model_uri, name, tags={**tags, **(extra or {})})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


# The data settings that make two validation figures comparable, as `ltexp tune` keys them.
DATA_KEY_FIELDS = ("dataset", "imb_type", "imb_factor", "val_source", "val_per_class", "data_seed")


def _alias_holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _validation_figure(client: MlflowClient, version, metric: str, data_key: str) -> float | None:
    """The version's value of `metric` on the data configuration `data_key`, or None when it was
    measured on other data or not at all. A tuned version carries its figure as tags; a version
    registered by hand (`ltexp register`) has it in its run's metrics and params."""
    tags = version.tags
    if schema.VAL_METRIC_VALUE in tags:
        same = tags.get(schema.DATA_CONFIG) == data_key and tags.get(schema.VAL_METRIC) == metric
        return float(tags[schema.VAL_METRIC_VALUE]) if same else None
    try:
        run = client.get_run(tags.get(schema.RUN_ID) or version.run_id)
    except (mlflow.exceptions.MlflowException, TypeError):
        return None
    settings = {**run.data.params, **{k.removeprefix("ltexp."): v for k, v in run.data.tags.items()}}
    if "|".join(settings.get(f, "") for f in DATA_KEY_FIELDS) != data_key or metric not in run.data.metrics:
        return None
    return float(run.data.metrics[metric])


def _ranks_above(figure: float, version: int, value: float, mine: int) -> bool:
    """Whether a version with `figure` ranks above this one (`value`, version `mine`): a higher
    figure, or the same figure registered earlier, so that two workers of one study registering
    the same best trial at once agree on one of them."""
    return figure > value or (figure == value and version < mine)


def register_and_promote(run_id: str, name: str, metric: str, value: float, data_key: str) -> tuple[int, bool, str]:
    """Register the run's model as `candidate`; make it `champion` only if it beats the champion.

    The champion is beaten when it was chosen on the same data configuration (`data_key`) and
    the same validation metric, and the new value is strictly higher; the old champion then
    becomes `previous`. With no champion yet, the new version becomes champion only if no
    existing version ranks above it on the same data and metric (a higher figure, or the same
    figure registered earlier; one registered by hand included). Moving `candidate` from a
    version that tuning did not put there is said. The comparison and the decision are tags on
    the new version and the returned line.

    Workers of one team finish at once and decide at once: a version crowned by a worker that
    could not yet see a better one, registered beside it, hands `champion` to the better one
    (`_settle_champion`), so the alias ends on the best version whatever the order of writes.
    """
    client = MlflowClient()
    old_candidate = _alias_holder(client, name, "candidate")
    # The figure is part of the registration: a worker deciding beside this one reads it at once.
    judged_on = {schema.VAL_METRIC: metric, schema.VAL_METRIC_VALUE: repr(float(value)), schema.DATA_CONFIG: data_key}
    version = register_model(run_id, name, "candidate", extra=judged_on)
    tags: dict[str, str] = {}
    champion = _alias_holder(client, name, "champion")
    rival = None
    if champion is None:
        others = [(v, _validation_figure(client, v, metric, data_key))
                  for v in client.search_model_versions(f"name = '{name}'") if int(v.version) != version]
        above = [(v, figure) for v, figure in others
                 if figure is not None and _ranks_above(figure, int(v.version), value, version)]
        if above:
            rival = max(above, key=lambda pair: (pair[1], -int(pair[0].version)))
            promote, decision = False, (f"not made @champion: v{rival[0].version} has {metric} {rival[1]:.6g} "
                                        f">= {value:.6g} on the same data")
        else:
            promote, decision = True, f"v{version} is now @champion ({metric} {value:.6g}; no champion before)"
    elif champion.tags.get(schema.DATA_CONFIG) != data_key or champion.tags.get(schema.VAL_METRIC) != metric:
        promote, decision = False, (f"kept champion v{champion.version}: it was chosen on "
                                    f"{champion.tags.get(schema.DATA_CONFIG)} / {champion.tags.get(schema.VAL_METRIC)}, "
                                    f"not comparable with {data_key} / {metric}")
    else:
        old = float(champion.tags[schema.VAL_METRIC_VALUE])
        promote = value > old
        decision = (f"v{version} is now @champion ({metric} {value:.6g}; previous champion v{champion.version}, "
                    f"{old:.6g})" if promote else
                    f"kept champion v{champion.version}: {metric} {value:.6g} <= {old:.6g}")
    compared = champion or (rival[0] if rival else None)
    if compared is not None:
        tags[schema.COMPARED_TO] = str(compared.version)
    if old_candidate is not None and schema.VAL_METRIC_VALUE not in old_candidate.tags:
        decision += f"; @candidate moved from v{old_candidate.version}, which ltexp tune had not set"
    tags[schema.PROMOTION] = decision
    # Tagged before the alias moves: a worker that settles the alias reads every crowned decision.
    for key, val in tags.items():
        client.set_model_version_tag(name, str(version), key, val)
    if promote:
        if champion is not None:
            client.set_registered_model_alias(name, "previous", champion.version)
        client.set_registered_model_alias(name, "champion", str(version))
        better = _settle_champion(client, name, version, metric, value, data_key)
        if better is not None:
            promote = False
            decision += (f"; then v{better.version}, crowned beside it with {metric} "
                         f"{float(better.tags[schema.VAL_METRIC_VALUE]):.6g}, ranks above it and holds @champion")
            client.set_model_version_tag(name, str(version), schema.PROMOTION, decision)
    return version, promote, decision


# How far apart two workers' registrations can be when one decided without seeing the other: at
# most one worker's register-decide-tag-alias sequence (a few requests: seconds, a minute on a
# loaded server). Versions crowned further apart are history (a champion moved by hand since
# stays where it was put).
SETTLE_WINDOW_S = 600


def _settle_champion(client: MlflowClient, name: str, version: int, metric: str, value: float, data_key: str):
    """After crowning `version`: the best version that another worker crowned beside it on the
    same data and metric, now made `champion`, or None when `version` ranks above them all.

    A worker decides on what the registry held when it looked; one that looked before a better
    version existed may set the alias after that version's worker did. Every worker settles after
    its own write and every crowned version is tagged before its write, so the last worker to
    write sees every crowned figure and leaves the alias on the best of them."""
    # Listed afresh, not reused from the decision: what matters is what other workers wrote
    # between this worker's look and its own alias write.
    versions = client.search_model_versions(f"name = '{name}'")
    (mine,) = [v for v in versions if int(v.version) == version]
    beside = [v for v in versions if int(v.version) != version
              and abs(v.creation_timestamp - mine.creation_timestamp) <= SETTLE_WINDOW_S * 1000
              and v.tags.get(schema.PROMOTION, "").startswith(f"v{v.version} is now @champion")
              and v.tags.get(schema.DATA_CONFIG) == data_key and v.tags.get(schema.VAL_METRIC) == metric]
    above = [v for v in beside if _ranks_above(float(v.tags[schema.VAL_METRIC_VALUE]), int(v.version), value, version)]
    if not above:
        return None
    best = max(above, key=lambda v: (float(v.tags[schema.VAL_METRIC_VALUE]), -int(v.version)))
    client.set_registered_model_alias(name, "champion", str(best.version))
    return best


def validate_registered_name(name: str, alias: str | None = None, flag: str = "--register-as") -> None:
    """Reject, before training, a registered-model name or alias that MLflow's registry refuses.

    MLflow's validators are not public API (tests/test_mlflow_internals.py watches them); the
    alternative, the registry's refusal, would come after training."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_name

    from ltexp import LtexpError

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise LtexpError(f"{flag} {name!r} is not a valid registered-model name: {exc.message} "
                         f"(use e.g. ltexp-digits)") from None
    if alias:
        try:
            _validate_model_alias_name(alias)
        except MlflowException as exc:
            raise LtexpError(f"--alias {alias!r} is not a valid alias: {exc.message}") from None
        if alias.lower() == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
            raise LtexpError(f"--alias {alias!r} is reserved by MLflow: use e.g. candidate or champion")
