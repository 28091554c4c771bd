"""What `ltexp tune` and `ltexp grid` share to coordinate workers through one Optuna storage.

- `storage`: storage URLs (LTEXP_STORAGE, the default beside the MLflow store), opening one with
  heartbeats, the file locks beside sqlite and journal storages, Optuna's dashboard on it;
- `budget`: at most n trials done or running in a study, however many workers share it;
- `claim`: which worker creates a study's (or grid's) MLflow parent run, the others join it;
- `cells`: a grid's cells as the trials of one study, handed out exactly once.
"""
