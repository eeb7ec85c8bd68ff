"""The ``launcher`` console script: hold stop signals while the head loads.

A Ctrl-C in the first tenth of a second used to land inside an import (a
traceback, and once in a while a crash inside a C extension's set-up). Here
a stop signal that arrives before the command line is ready is only noted;
the CLI then stops at once, cleanly. A signal ignored when the process
started (``nohup``) is left ignored.

It leaves without the interpreter's finalisation, once its output is
flushed: tearing down the ~100 modules the head loaded took 11 ms, a tenth
of a short loopback job; the head's threads are daemons by then, its log
files closed, its agents gone.
"""

# _signal, the C module, not signal: it is loaded with the interpreter, while importing signal.py reads a file,
# and a Ctrl-C in that import (seen at 20 ms in a fresh venv) was a traceback through this module.
import _signal as signal
import os
import sys

OPERATE = ("ps", "status", "logs", "stop")  # the subcommands of launcher.operate.add_parsers: they need no head


def main():  # never returns (os._exit); no typing import for the annotation: a Ctrl-C during it is a traceback
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    ignored = frozenset(s for s in stops if signal.getsignal(s) == signal.SIG_IGN)
    held: list[int] = []
    for s in stops:
        if s not in ignored:
            signal.signal(s, lambda signum, _frame: held.append(signum))
    if sys.argv[1:2] and sys.argv[1] in OPERATE and not held:
        from launcher import operate  # a job's operations: nothing of the head needs loading

        for s in stops:
            if s not in ignored:
                signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        code = operate.main(sys.argv[1:])
    else:
        from launcher import cli  # everything heavy loads here, with the signals held

        code = cli.main(held=held, ignored=ignored)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the CLI has said what it could
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
