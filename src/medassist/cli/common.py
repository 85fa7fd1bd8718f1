"""What every command module shares: messages on stderr and progress bars."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """A progress or warning line on stderr (results go to stdout)."""
    print(f"medassist: {message}", file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar per phase on stderr (the library only calls back): ``progress(desc, total)``
    returns the bar's ``update``."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, description: str, total: int):
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=description, unit="q", file=sys.stderr, leave=True)
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
