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


def write_error(what: str, where: object, exc: BaseException) -> LtexpError:
    """The one line for a write that failed: `could not write <what> to <where>: <reason>`.

    The reason is the operating system's (`No space left on device`, `File too large`) when an
    `OSError` lies in `exc`'s chain (torch.save raises its RuntimeError while handling one), else
    the first line of the innermost exception (e.g. SQLite's `database or disk is full`)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    os_error = next((e for e in chain if isinstance(e, OSError) and e.strerror), None)
    if os_error is not None:
        reason = os_error.strerror
    else:
        lines = str(chain[-1]).strip().splitlines()
        reason = lines[0] if lines else type(chain[-1]).__name__
    return LtexpError(f"could not write {what} to {where}: {reason}")
