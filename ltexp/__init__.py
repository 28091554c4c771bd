"""ltexp: reproducible long-tailed image classification experiments.

Training, evaluation and fusion of class-group experts, tracked in MLflow and tuned with Optuna.
"""

import re

__version__ = "0.1.0"

# A URL's userinfo password (`scheme://user:password@host`) and a libpq/SQLAlchemy-style
# `password=` query or keyword value: what `redact` masks.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)[^\s@]+@")
_KEY_PASSWORD = re.compile(r"(\bpassword=)[^\s&;'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL password replaced by `***` (`postgresql+psycopg://ltexp:***@db/optuna`).

    The one redaction of ltexp: every `LtexpError` message, every `ltexp.error` tag and every
    URL ltexp logs as a param goes through it, so a password never reaches a terminal, a log or
    the tracking store."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class LtexpError(Exception):
    """A user-facing error: bad input or an unusable environment.

    The message is one line that names the bad value and what is allowed; the CLI prints it
    without a traceback and exits non-zero. Passwords in it are masked (`redact`).
    """

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact(str(message)), *args)
