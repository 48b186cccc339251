"""The experiments' command-line machinery: a parser whose mistakes are one line, and run_main.

    parser = ArgumentParser(description=...)       # no prefix matching; "did you mean --quick?"
    parser.add_argument("--k", type=int_in(2, 100))   # refused at parse time, naming the flag
    if __name__ == "__main__": run_main(main)       # a user error: one line, exit 2; Ctrl-C: one line, 130
"""
from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
from typing import Sequence

from jaxadv.checkpoint import CheckpointError
from jaxadv.data import DataError
from jaxadv.io import NotWritable
from jaxadv.chunk_folder import SweepMismatch
from jaxadv.zoo import ConfigError, WorkdirMismatch

#: Options that change no result (where things are, how the work is split): left out of run names.
NOT_IN_RUN_NAME = frozenset({"help", "workdir", "data_dir", "distributed", "coordinator", "num_processes",
                             "process_id", "chunk_size"})


class UsageError(ValueError):
    """A mistake of the command line or its surroundings (a workdir that is a file, ...), not a bug."""


#: What `run_main` reports in one line with exit status 2 instead of a traceback: the user's to fix.
USER_ERRORS = (UsageError, DataError, SweepMismatch, NotWritable, WorkdirMismatch, ConfigError, CheckpointError)


def int_in(low: int, high: int | None = None):
    """An argparse type: an int in [low, high] (no upper bound when high is None), refused at parse time."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}, "
                                             f"got {value}")
        return value
    parse.__name__ = "int"     # argparse names the type in its messages
    return parse


positive_int = int_in(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser as the experiments want it: a mistake is one line naming the flag, exit status 2; a
    flag is never matched by a prefix (--num-image is an error, not --num-images), and an unknown one gets the
    usage and the nearest flag ("did you mean --quick?"). It keeps, in order, the flags that name a run: those
    given to its own add_argument (an argument group's would be left out of run names)."""

    def __init__(self, *args, **kwargs):
        self.flags: list[argparse.Action] = []      # every optional flag, in the order added (--help first)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.flags.append(action)
        return action

    @property
    def run_name_flags(self) -> list[argparse.Action]:
        """The flags whose values change a run's results (all but NOT_IN_RUN_NAME), in the order added."""
        return [action for action in self.flags if action.dest not in NOT_IN_RUN_NAME]

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            self.print_usage(sys.stderr)
            message += _did_you_mean(message.split(": ", 1)[1].split(), self.flags)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _did_you_mean(words: Sequence[str], flags: Sequence[argparse.Action]) -> str:
    """" (did you mean --quick?)" for the unknown flags among `words` that are near a known one, else ""."""
    known = [flag for action in flags for flag in action.option_strings]
    guesses = [difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
               for word in words if word.startswith("-")]
    hint = "; ".join(f"did you mean {guess[0]}?" for guess in guesses if guess)
    return f" ({hint})" if hint else ""


def run_main(main, argv: Sequence[str] | None = None) -> None:
    """Run an experiment's `main` (with `argv` if given) as a command.

    On Ctrl-C it says what is kept, in one line, and exits 130 at once; a user error (USER_ERRORS: missing
    data, an unusable workdir, saved results that refuse to mix, a damaged checkpoint; a full disk) ends in
    one line and exit status 2. Tracebacks are for bugs. Returns what `main` returns (a script's exit status).
    """
    try:
        return main() if argv is None else main(argv)
    except KeyboardInterrupt:
        print("interrupted: trained models and finished attack chunks are saved in the workdir; "
              "run the same command again to resume.", file=sys.stderr, flush=True)
        # At once: a chunk's computation may still run in XLA's threads, and nothing of it is kept (the
        # saved files are whole: each was written to a temporary name and moved into place).
        sys.stdout.flush()
        os._exit(130)
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written to a temporary name first: what was saved before stays whole and loadable.
        print(f"error: no space left on the device of {error.filename or 'the workdir'!r}; what was saved "
              "before is kept: free some space and run the same command again to resume", file=sys.stderr)
        raise SystemExit(2) from None
