"""ltexp: reproducible long-tailed image classification experiments.

Training, evaluation and fusion of class-group experts, tracked in MLflow and tuned with Optuna.
"""

__version__ = "0.1.0"


class LtexpError(Exception):
    """A user-facing error: bad input or an unusable environment.

    The message is one line that names the bad value and what is allowed; the CLI prints it
    without a traceback and exits non-zero.
    """
