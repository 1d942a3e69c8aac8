"""One place that decides what a user of the command line sees from the libraries under it.

By default only our own output reaches the terminal: transformers / huggingface_hub / PEFT logging, library
warnings (FutureWarning, bitsandbytes' cast notices, ...), bitsandbytes' "kernels" line and library progress bars
("Loading weights") are silenced. `mergekit-subspace --verbose` leaves every library at its own defaults.

It only sets environment variables, `warnings` filters and stdlib logger levels: nothing heavy is imported, so
`--help` stays fast, and it runs before any command imports transformers (which reads its verbosity from the
environment on import). Variables a user set themselves are left as they are.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Read by the libraries when they are first imported.
_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars follow this switch too
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "BITSANDBYTES_NOWELCOME": "1",
}
OUR_LOGGER = "mergekit_subspace"


class _OursOnly(logging.Handler):
    """Print records of our own loggers to the current stderr; drop those of libraries that have no handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == OUR_LOGGER or record.name.startswith(OUR_LOGGER + ".")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.name}: {record.getMessage()}\n")
        except Exception:  # a closed or broken stderr must not break the command
            self.handleError(record)


def configure(verbose: bool = False) -> None:
    """Quiet the libraries (or, with `verbose`, leave them be and show our own info lines too)."""
    ours = logging.getLogger(OUR_LOGGER)
    if verbose:
        ours.setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        return
    for name, value in _ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")  # library warnings; our own messages are printed, not warned
    # A root handler that passes only our records: library loggers with no handler of their own (bitsandbytes,
    # peft, torch, accelerate) would otherwise reach logging's last-resort stderr printer.
    root = logging.getLogger()
    if not any(isinstance(h, _OursOnly) for h in root.handlers):
        root.addHandler(_OursOnly())
    ours.setLevel(logging.WARNING)
