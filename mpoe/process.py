"""Process-wide settings the entry points (mpoe-train, mpoe-report, bench) make once, before any work.

Libraries' import-time notices that cannot matter to a user of this package
(Megatron's "Transformer Engine and Apex are not installed", its "Detected
Megatron Core" lines, the gcc test compiles of DeepSpeed's op builder) would
fill the first lines of every run and land inside the progress bar. They are filtered here, by category and
module, and only for processes started through an entry point: importing
`mpoe` as a library changes no global state. What remains goes through
`logging` (Python warnings included), so Hydra writes it to `main.log` and the
console handler can route it around tqdm.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

# (message regex, category, module regex): warnings about optional libraries and APIs we use on purpose.
_QUIET_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\."),
    (r".*Megatron-FSDP", UserWarning, r"megatron\."),
)
# Loggers whose INFO lines describe library internals (optional backends detected, test compiles).
_QUIET_LOGGERS = ("megatron", "compilers", "distutils", "torch.distributed.elastic.multiprocessing.redirects")


# (logger, message part): single log records that describe a library default, not a problem of the run.
_QUIET_RECORDS = (
    # the default it falls back to (ForCausalLMLoss) is the loss our GPT-2 means to use
    ("transformers.modeling_utils", "` was set in the config but it is unrecognized"),
)


class _DropMessages(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(part in message for part in self.parts)


def quiet_library_notices() -> None:
    for message, category, module in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, part in _QUIET_RECORDS:
        logging.getLogger(name).addFilter(_DropMessages((part,)))
    logging.captureWarnings(True)  # the rest reach Hydra's handlers (console and main.log) as 'py.warnings'


def configure_process() -> None:
    """Called first by every entry point: DeepSpeed's accelerator, quiet library notices, thread count."""
    # Deferred: it imports torch, which importing this module (the library's quiet settings) need not.
    from mpoe.parallel.deepspeed.accelerator import configure_accelerator

    configure_accelerator()
    quiet_library_notices()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning from tokenizers in workers
    # datasets' "Generating train split" bars would print beside ours, and stay on screen above a data error
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def library_stdout_to_log(name: str = "mpoe.libraries"):
    """What a library prints (DeepSpeed: "op ... built successfully") goes to the log at DEBUG, not the terminal."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logging.getLogger(name).debug(line)
