"""The ``launcher`` console script: hold stop signals while the head loads.

A Ctrl-C in the first tenth of a second used to land inside an import (a
traceback, and once in a while a crash inside a C extension's set-up). Here
a stop signal that arrives before the command line is ready is only noted;
the CLI then stops at once, cleanly. A signal ignored when the process
started (``nohup``) is left ignored.
"""

import signal
import sys


def main() -> int:
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    ignored = frozenset(s for s in stops if signal.getsignal(s) == signal.SIG_IGN)
    held: list[int] = []
    for s in stops:
        if s not in ignored:
            signal.signal(s, lambda signum, _frame: held.append(signum))
    from launcher import cli  # everything heavy loads here, with the signals held

    return cli.main(held=held, ignored=ignored)


if __name__ == "__main__":
    sys.exit(main())
